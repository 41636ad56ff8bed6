"""The run: setup, the generator processes, merging their results, verification; the CLI.

Setup, the ``/metrics`` scrapes, the progress line and verification run once, in the main
process. The users run in ``--processes`` generator processes (children started with
``spawn``: forking a process that holds an event loop and a connection pool is unsafe), or in
the main process when there is one. Each child gets its :class:`~.share.Share` (page ids, its
range of user numbers) and sends back a :class:`~.share.ShareResult`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import math
import multiprocessing
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Any, TextIO

import httpx

from examples.loadtest.metrics import (
    QueueSample,
    Sampler,
    scrape_histograms,
    server_latency,
    wait_for_idle_queue,
)
from examples.loadtest.options import Options, parse_args, split_users
from examples.loadtest.recording import Ack
from examples.loadtest.report import GeneratorStats, Results, report
from examples.loadtest.share import ProgressSnapshot, Share, ShareResult, child_main, load_share
from examples.loadtest.stats import count_5xx, lag_summary, ms, percentile, summary
from examples.loadtest.users import run_tag
from examples.loadtest.verify import Verification, create_pages, verify_saves, wait_for_search
from examples.pages_service.client import SaveFailed

READY_TIMEOUT = 120.0  # seconds the children may take to start (import, connect the pipe)
STOP_TIMEOUT = 10.0  # seconds a child may take to exit after sending its results


class GeneratorFailed(RuntimeError):
    """A generator process crashed, or exited without its results."""


# --- progress ---------------------------------------------------------------------------------


class Progress:
    """The newest :class:`ProgressSnapshot` of every generator process, summed for one line."""

    def __init__(self) -> None:
        self.latest: dict[int, ProgressSnapshot] = {}
        self.save_latencies: list[float] = []

    def update(self, snapshot: ProgressSnapshot) -> None:
        """Take a process's newest snapshot."""
        self.latest[snapshot.process] = snapshot
        self.save_latencies.extend(snapshot.save_latencies)

    def line(self, elapsed: float, samples: list[QueueSample]) -> str:
        """Elapsed, saves, req/s, p95 of saves so far, 412/429 counts, queue depth."""
        elapsed = max(elapsed, 1e-9)
        snapshots = self.latest.values()
        acks = sum(s.acks for s in snapshots)
        requests = sum(s.requests for s in snapshots)
        statuses: Counter[int] = Counter()
        for s in snapshots:
            statuses.update(s.statuses)
        p95 = percentile(self.save_latencies, 95)
        queue = f"{samples[-1].total:.0f}" if samples else "-"
        return (
            f"[{elapsed:6.1f}s] saves {acks} ({acks / elapsed:.1f}/s)  "
            f"req {requests} ({requests / elapsed:.1f}/s)  "
            f"p95 {ms(p95)}  412 {statuses[412]}  429 {statuses[429]}  "
            f"conflicts {sum(s.conflicts for s in snapshots)}  5xx {count_5xx(statuses)}  "
            f"queue {queue}  users saving {sum(s.saving for s in snapshots)}"
        )


async def show_progress(
    progress: Progress, clock: Callable[[], float], samples: list[QueueSample], stream: TextIO
) -> None:
    """Redraw the progress line ~4 times a second on a terminal, else print it every 5 s."""
    tty = stream.isatty()
    try:
        while True:
            await asyncio.sleep(0.25 if tty else 5.0)
            line = progress.line(clock(), samples)
            stream.write(f"\r{line}\x1b[K" if tty else f"{line}\n")
            stream.flush()
    finally:
        if tty:
            stream.write("\n")
            stream.flush()


# --- the generator processes ------------------------------------------------------------------


Message = tuple[int, str, Any]  # (process, kind, payload)


class Generators:
    """Child generator processes, one per share: started and ready on entry, stopped on exit."""

    def __init__(self, shares: Sequence[Share]) -> None:
        self.shares = list(shares)
        self.processes: list[BaseProcess] = []
        self.go_ends: list[Connection] = []
        self.out_ends: list[Connection] = []
        self.readers: list[threading.Thread] = []
        self.queue: asyncio.Queue[Message] = asyncio.Queue()
        self.results: dict[int, ShareResult] = {}

    async def __aenter__(self) -> Generators:
        context = multiprocessing.get_context("spawn")
        loop = asyncio.get_running_loop()
        try:
            for share in self.shares:
                go_recv, go_send = context.Pipe(duplex=False)
                out_recv, out_send = context.Pipe(duplex=False)
                process = context.Process(
                    target=child_main,
                    args=(share, go_recv, out_send),
                    name=f"loadtest-generator-{share.process}",
                    daemon=True,
                )
                process.start()
                go_recv.close()  # the child holds these ends now: its exit shows as EOF
                out_send.close()
                self.processes.append(process)
                self.go_ends.append(go_send)
                self.out_ends.append(out_recv)
                reader = threading.Thread(
                    target=self._read,
                    args=(share.process, out_recv, loop),
                    name=f"loadtest-reader-{share.process}",
                    daemon=True,
                )
                reader.start()
                self.readers.append(reader)
            try:
                await asyncio.wait_for(self._ready(), READY_TIMEOUT)
            except asyncio.TimeoutError:
                message = f"generator processes not ready in {READY_TIMEOUT:g} s"
                raise GeneratorFailed(message) from None
        except BaseException:
            await asyncio.to_thread(self._stop, False)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        finished = len(self.results) == len(self.shares)
        await asyncio.to_thread(self._stop, finished)

    def _read(self, process: int, out: Connection, loop: asyncio.AbstractEventLoop) -> None:
        """A reader thread: pass ``process``'s messages to the event loop until its last."""
        while True:
            try:
                kind, payload = out.recv()
            except (EOFError, OSError):
                kind, payload = "exit", None
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                loop.call_soon_threadsafe(self.queue.put_nowait, (process, kind, payload))
            if kind in ("result", "error", "exit"):
                return

    def _failed(self, process: int, kind: str, payload: Any) -> GeneratorFailed:
        if kind == "error":
            return GeneratorFailed(f"generator process {process} failed:\n{payload}")
        self.processes[process].join(1.0)  # reap it, for its exit code
        code = self.processes[process].exitcode
        return GeneratorFailed(f"generator process {process} exited (code {code}) unfinished")

    async def _ready(self) -> None:
        ready: set[int] = set()
        while len(ready) < len(self.shares):
            process, kind, payload = await self.queue.get()
            if kind != "ready":
                raise self._failed(process, kind, payload)
            ready.add(process)

    def go(self) -> None:
        """Start every process's load phase."""
        for end in self.go_ends:
            with contextlib.suppress(OSError):  # that child died: collect() will say so
                end.send("go")

    async def collect(
        self, progress: Callable[[ProgressSnapshot], None] | None = None
    ) -> list[ShareResult]:
        """Every process's results, in process order (passing their snapshots to ``progress``).

        Raises:
            GeneratorFailed: a process crashed or exited without its results.
        """
        while len(self.results) < len(self.shares):
            process, kind, payload = await self.queue.get()
            if kind == "progress":
                if progress is not None:
                    progress(payload)
            elif kind == "result":
                self.results[process] = payload
            elif not (kind == "exit" and process in self.results):
                raise self._failed(process, kind, payload)
        return [self.results[share.process] for share in self.shares]

    def _stop(self, finished: bool) -> None:
        """Wait for the children to exit (at once when not ``finished``), kill stragglers."""
        for process in self.processes:
            process.join(STOP_TIMEOUT if finished else 0.0)
            if process.is_alive():
                process.terminate()
                process.join(STOP_TIMEOUT)
            if process.is_alive():
                process.kill()
                process.join()
        for reader in self.readers:
            reader.join(STOP_TIMEOUT)  # the children are gone: each sees its pipe's EOF
        for end in (*self.go_ends, *self.out_ends):
            end.close()
        for process in self.processes:
            process.close()


def make_shares(options: Options, page_ids: list[str], tag: str) -> list[Share]:
    """The users spread over ``options.generator_processes`` shares (global user numbers)."""
    ranges = split_users(options.users, options.generator_processes)
    child_options = dataclasses.replace(options, admin_token=None)  # only the main one needs it
    shares = []
    for process, users in enumerate(ranges):
        if options.connections:
            connections = max(1, math.ceil(options.connections / len(ranges)))
        else:
            connections = len(users) + 8
        shares.append(
            Share(process, child_options, page_ids, users.start, len(users), tag, connections)
        )
    return shares


# --- merging ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Merged:
    """Every generator process's results, together."""

    requests: int = 0
    latencies: dict[str, list[float]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list)
    )
    statuses: dict[str, Counter[int]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(Counter)
    )
    errors: Counter[str] = dataclasses.field(default_factory=Counter)
    save_latencies: list[float] = dataclasses.field(default_factory=list)
    save_latencies_no_429: list[float] = dataclasses.field(default_factory=list)
    open_latencies: list[float] = dataclasses.field(default_factory=list)
    acks: list[Ack] = dataclasses.field(default_factory=list)
    outcomes: Counter[str] = dataclasses.field(default_factory=Counter)
    edit_kinds: Counter[str] = dataclasses.field(default_factory=Counter)
    ambiguous: Counter[str] = dataclasses.field(default_factory=Counter)
    honoured_429: int = 0
    early_429: int = 0
    client: Counter[str] = dataclasses.field(default_factory=Counter)
    lags: list[float] = dataclasses.field(default_factory=list)
    cpu_seconds: float = 0.0
    generators: list[GeneratorStats] = dataclasses.field(default_factory=list)


def merge(results: Sequence[ShareResult]) -> Merged:
    """Every process's counts summed and samples concatenated, with each one's own stats."""
    merged = Merged()
    for r in results:
        merged.requests += r.requests
        for kind, values in r.latencies.items():
            merged.latencies[kind].extend(values)
        for kind, counts in r.statuses.items():
            merged.statuses[kind].update(counts)
        merged.errors.update(r.errors)
        merged.save_latencies.extend(r.save_latencies)
        merged.save_latencies_no_429.extend(r.save_latencies_no_429)
        merged.open_latencies.extend(r.open_latencies)
        merged.acks.extend(r.acks)
        merged.outcomes.update(r.outcomes)
        merged.edit_kinds.update(r.edit_kinds)
        merged.ambiguous.update(r.ambiguous)
        merged.honoured_429 += r.honoured_429
        merged.early_429 += r.early_429
        merged.client.update(r.client)
        merged.lags.extend(r.lags)
        merged.cpu_seconds += r.cpu_seconds
        merged.generators.append(
            GeneratorStats(
                process=r.process,
                first_user=r.first_user,
                users=r.users,
                requests=r.requests,
                acknowledged=len(r.acks),
                load_seconds=r.load_seconds,
                cpu_seconds=r.cpu_seconds,
                cpu_percent=_percent(r.cpu_seconds, r.load_seconds),
                loop_lag_ms=lag_summary(r.lags),
                save_ms=summary(r.save_latencies),
            )
        )
    return merged


def _percent(cpu_seconds: float, wall_seconds: float) -> float:
    return round(100.0 * cpu_seconds / wall_seconds, 1) if wall_seconds > 0 else 0.0


# --- the run ----------------------------------------------------------------------------------


async def run(options: Options, *, stream: TextIO | None = None) -> Results:
    """Set up, load, verify; return the results (nothing printed on stdout).

    Args:
        options: what to run.
        stream: where progress goes (default stderr; only with ``options.progress``).

    Raises:
        GeneratorFailed: a generator process crashed.
    """
    rng = random.Random(f"{options.seed}/setup")
    admin_headers = (
        {"Authorization": f"Bearer {options.admin_token}"} if options.admin_token else {}
    )
    timeout = httpx.Timeout(options.timeout)
    async with httpx.AsyncClient(
        base_url=options.url, timeout=timeout, headers=admin_headers
    ) as admin:
        started = time.monotonic()
        setup_failures: Counter[str] = Counter()
        pages = await create_pages(admin, options, rng, setup_failures)
        setup_seconds = time.monotonic() - started
        settle_seconds = (
            await wait_for_idle_queue(admin, options.settle) if options.settle > 0 else None
        )

        shares = make_shares(options, list(pages), run_tag())
        progress = Progress()
        on_progress = progress.update if options.progress else None
        sampler = Sampler()
        background: list[asyncio.Future[None]] = []

        def start_background() -> None:
            load_started = time.monotonic()

            def clock() -> float:
                return time.monotonic() - load_started

            interval = options.scrape_interval
            background.append(asyncio.ensure_future(sampler.run(admin, clock, interval)))
            if options.progress:
                view = show_progress(progress, clock, sampler.samples, stream or sys.stderr)
                background.append(asyncio.ensure_future(view))

        try:
            if len(shares) == 1:  # the users run here, in this event loop
                histograms_before = await scrape_histograms(admin)
                start_background()
                results = [await load_share(shares[0], progress=on_progress)]
            else:
                async with Generators(shares) as generators:  # started, imported, waiting
                    histograms_before = await scrape_histograms(admin)
                    generators.go()
                    start_background()
                    results = await generators.collect(on_progress)
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
        histograms_after = await scrape_histograms(admin)

        merged = merge(results)
        verification = Verification()
        await verify_saves(admin, pages, merged.acks, merged.ambiguous, verification)
        await wait_for_search(admin, merged.acks, options.search_timeout, verification)

    load_seconds = max(r.load_seconds for r in results)
    latency = {
        "save (as the user waited)": summary(merged.save_latencies),
        "save (no 429 wait)": summary(merged.save_latencies_no_429),
        "open (GET, no local copy)": summary(merged.open_latencies),
        **{f"{kind} request": summary(v) for kind, v in sorted(merged.latencies.items())},
        "every request": summary([x for v in merged.latencies.values() for x in v]),
    }
    return Results(
        options=options,
        setup_seconds=setup_seconds,
        settle_seconds=settle_seconds,
        setup_failures=dict(setup_failures),
        load_seconds=load_seconds,
        requests=merged.requests,
        statuses={k: dict(v) for k, v in merged.statuses.items()},
        errors=dict(merged.errors),
        outcomes=dict(merged.outcomes),
        edit_kinds=dict(merged.edit_kinds),
        latency_ms=latency,
        client=dict(merged.client),
        queue_samples=sampler.samples,
        scrape_failures=sampler.failures,
        honoured_429=merged.honoured_429,
        early_429=merged.early_429,
        generator_cpu=merged.cpu_seconds / load_seconds if load_seconds > 0 else 0.0,
        loop_lag_ms=lag_summary(merged.lags),
        generators=merged.generators,
        server_latency_ms=server_latency(histograms_before, histograms_after),
        verification=verification,
        acks=merged.acks,
    )


async def amain(argv: Sequence[str] | None = None) -> int:
    """Run the load test from the command line's options; the exit status."""
    options = parse_args(argv)
    try:
        results = await run(options)
    except (SaveFailed, httpx.HTTPError, GeneratorFailed) as exc:
        print(f"load test failed: {exc}", file=sys.stderr)
        return 2
    report(results, sys.stdout)
    if options.json_path:
        with open(options.json_path, "w", encoding="utf-8") as file:
            json.dump(results.to_json(), file, indent=2, default=str)
    return 0 if results.verification.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m examples.loadtest``."""
    return asyncio.run(amain(argv))
