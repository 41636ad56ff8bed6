"""One generator process's share of the users: its load phase, and the child process's entry.

A share runs in its own event loop with its own ``httpx`` pool, in the main process (one
generator process) or in a child started with ``spawn``. Everything it sends back is plain,
pickle-able data: :class:`ShareResult` at the end and, with progress on,
:class:`ProgressSnapshot` twice a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import signal
import time
import traceback
from collections import Counter
from collections.abc import Callable
from multiprocessing.connection import Connection

import httpx

from examples.loadtest.metrics import measure_lag
from examples.loadtest.options import Options
from examples.loadtest.recording import Ack, Recorder, TimingTransport
from examples.loadtest.users import Run

START_TIMEOUT = 300.0  # seconds a child waits for the start signal before giving up
PROGRESS_INTERVAL = 0.5


@dataclasses.dataclass
class Share:
    """One generator process's work.

    Attributes:
        process: the process's number (0 ..).
        options: the run's options (without the admin token).
        page_ids: every page of the run, hot ones first.
        first_user: the number of its first user; user numbers are global, so ``X-User``
            headers, seeds and markers stay unique across processes.
        users: how many users it runs.
        tag: the run's marker tag (the same for every process).
        connections: its connection pool's size.
    """

    process: int
    options: Options
    page_ids: list[str]
    first_user: int
    users: int
    tag: str
    connections: int

    @property
    def user_numbers(self) -> range:
        """Its users' numbers."""
        return range(self.first_user, self.first_user + self.users)


@dataclasses.dataclass
class ShareResult:
    """What one generator process measured; merged by the main process."""

    process: int
    first_user: int
    users: int
    load_seconds: float
    cpu_seconds: float
    lags: list[float]
    requests: int
    latencies: dict[str, list[float]]
    statuses: dict[str, dict[int, int]]
    errors: dict[str, int]
    save_latencies: list[float]
    save_latencies_no_429: list[float]
    open_latencies: list[float]
    acks: list[Ack]
    outcomes: dict[str, int]
    edit_kinds: dict[str, int]
    ambiguous: dict[str, int]
    honoured_429: int
    early_429: int
    client: dict[str, int]


@dataclasses.dataclass
class ProgressSnapshot:
    """One generator process's counts so far, for the progress line.

    ``save_latencies`` holds only the saves acknowledged since its previous snapshot.
    """

    process: int
    acks: int
    requests: int
    statuses: dict[int, int]
    conflicts: int
    saving: int
    save_latencies: list[float]


async def load_share(
    share: Share,
    *,
    progress: Callable[[ProgressSnapshot], None] | None = None,
    interval: float = PROGRESS_INTERVAL,
) -> ShareResult:
    """Run ``share``'s users to the end of the load phase; what they measured.

    Args:
        share: which users, on which pages.
        progress: called with a :class:`ProgressSnapshot` every ``interval`` seconds.
        interval: seconds between snapshots.
    """
    options = share.options
    size = share.connections
    limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
    recorder = Recorder(options.max_wait)
    transport = TimingTransport(httpx.AsyncHTTPTransport(limits=limits), recorder)
    timeout = httpx.Timeout(options.timeout)
    lags: list[float] = []
    async with httpx.AsyncClient(
        base_url=options.url, timeout=timeout, transport=transport
    ) as http:
        recorder.started = time.monotonic()
        state = Run(options, share.page_ids, recorder, tag=share.tag, process=share.process)
        background = [asyncio.ensure_future(measure_lag(lags))]
        if progress is not None:
            background.append(asyncio.ensure_future(_snapshots(state, progress, interval)))
        cpu = time.process_time()
        users = [asyncio.ensure_future(state.user(http, n)) for n in share.user_numbers]
        try:
            await _finish(users, state)
        finally:
            load_seconds = recorder.now()
            cpu = time.process_time() - cpu
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)

    client: Counter[str] = Counter()
    for pages_client in state.clients:
        stats = dataclasses.asdict(pages_client.stats)
        client.update({k: v for k, v in stats.items() if k != "statuses"})
    return ShareResult(
        process=share.process,
        first_user=share.first_user,
        users=share.users,
        load_seconds=load_seconds,
        cpu_seconds=cpu,
        lags=lags,
        requests=recorder.requests,
        latencies=dict(recorder.latencies),
        statuses={kind: dict(counts) for kind, counts in recorder.statuses.items()},
        errors=dict(recorder.errors),
        save_latencies=recorder.save_latencies,
        save_latencies_no_429=recorder.save_latencies_no_429,
        open_latencies=recorder.open_latencies,
        acks=recorder.acks,
        outcomes=dict(recorder.outcomes),
        edit_kinds=dict(recorder.edit_kinds),
        ambiguous=dict(recorder.ambiguous),
        honoured_429=recorder.honoured_429,
        early_429=recorder.early_429,
        client=dict(client),
    )


async def _snapshots(state: Run, send: Callable[[ProgressSnapshot], None], interval: float) -> None:
    """Send a :class:`ProgressSnapshot` every ``interval`` seconds (until cancelled)."""
    rec, sent = state.recorder, 0
    while True:
        await asyncio.sleep(interval)
        new = rec.save_latencies[sent:]
        sent += len(new)
        send(
            ProgressSnapshot(
                process=state.process,
                acks=len(rec.acks),
                requests=rec.requests,
                statuses=dict(rec.status_total()),
                conflicts=rec.outcomes["conflict (PatchConflict)"],
                saving=len(state.saving),
                save_latencies=new,
            )
        )


async def _finish(users: list[asyncio.Task[None]], state: Run) -> None:
    """Wait for the users; past the deadline, grace and a timeout, cancel the stragglers."""
    if state.deadline is None:
        await asyncio.gather(*users)
        return
    cutoff = state.deadline + state.options.grace + state.options.timeout + 5.0
    _, late = await asyncio.wait(users, timeout=max(0.0, cutoff - time.monotonic()))
    for task in late:
        task.cancel()
    for page_id in state.saving.values():  # cancelled mid-save: it may have committed
        state.recorder.ambiguous[page_id] += 1
        state.recorder.outcomes["cancelled mid-save"] += 1
    await asyncio.gather(*users, return_exceptions=True)
    for task in users:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise error


def child_main(share: Share, go: Connection, out: Connection) -> None:
    """A generator child process: say ready, wait for ``go``, run the share, send its results.

    Messages on ``out`` are ``(kind, payload)``: ``("ready", None)``, ``("progress",
    ProgressSnapshot)``, then ``("result", ShareResult)`` or ``("error", traceback text)``.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the main process stops us
    try:
        out.send(("ready", None))
        if not go.poll(START_TIMEOUT):
            raise TimeoutError(f"no start signal in {START_TIMEOUT:g} s")
        go.recv()  # EOFError: the main process went away
        snapshots = functools.partial(_send_progress, out) if share.options.progress else None
        result = asyncio.run(load_share(share, progress=snapshots))
        out.send(("result", result))
    except Exception:
        with contextlib.suppress(OSError):  # nobody is listening any more
            out.send(("error", traceback.format_exc()))
    finally:
        out.close()
        go.close()


def _send_progress(out: Connection, progress: ProgressSnapshot) -> None:
    out.send(("progress", progress))
