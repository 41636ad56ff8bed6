"""``examples/loadtest/`` against the real pages service (uvicorn subprocess, SQLite file).

Small runs: users race on a hot page, so saves meet 412s, rebase and land; afterwards every
acknowledged marker is on its page, versions count the acknowledged saves, and search finds
each page's newest marker. With a tiny save limit, 429s are counted and waited out. With two
generator processes, the main process merges what each one acknowledged and verifies it all.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from examples.loadtest import (
    GeneratorStats,
    Options,
    Results,
    amain,
    generator_warnings,
    histogram_quantile,
    make_edit,
    make_page,
    parse_args,
    queue_depth,
    run,
    server_latency,
    sparkline,
    split_users,
    warning_line,
)

from hardening import Metrics, apply_patch
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "admin-token-for-the-load-tests-0123456789"

Serve = Callable[..., str]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    """Start ``python -m examples.pages_service`` with extra env; stop it at teardown."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(**env: str) -> str:
        port = free_port()
        log = (tmp_path / f"server-{port}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "examples.pages_service", "--port", str(port)],
            cwd=tmp_path,
            env={
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "DATABASE_URL": f"sqlite:///{tmp_path / 'pages.db'}",
                "WORKER_MODE": "inprocess",
                "ADMIN_TOKEN": ADMIN,
                "IP_LIMIT": "100000/minute",
                "SAVE_LIMIT": "1000/minute",
                **env,
            },
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        processes.append(process)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited:\n{(tmp_path / f'server-{port}.log').read_text()}")
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    return base
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("server did not become healthy in 30 s")
            time.sleep(0.1)

    yield start
    for process in processes:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _describe(results: Results) -> str:
    v = results.verification
    return (
        f"outcomes {results.outcomes}, statuses {results.statuses}, errors {results.errors}, "
        f"missing {v.missing_markers[:5]}, problems {v.problems[:5]}, search {v.search_missing}"
    )


@pytest.mark.anyio
async def test_concurrent_editors_lose_nothing(serve: Serve) -> None:
    """Users racing on a hot page: 412s rebase and land; nothing acknowledged is lost."""
    base = serve()
    options = Options(
        url=base, users=8, pages=3, blocks=20, duration=None, edits_per_user=6, think=0.0,
        shared=0.8, hot_pages=1, admin_token=ADMIN, seed=7, progress=False,
        search_timeout=20.0,
    )  # fmt: skip
    results = await run(options)  # fixed work: 48 edits, however fast the machine

    assert results.verification.ok, _describe(results)
    statuses = results.status_total()
    ended = {k: v for k, v in results.outcomes.items() if "after a 412" not in k}
    assert sum(ended.values()) == 8 * 6, _describe(results)  # every edit ended exactly once
    # under this much contention a client may give up after its rebase retries (412)
    expected = {"acknowledged", "conflict (PatchConflict)", "failed (412)"}
    assert set(ended) <= expected, _describe(results)
    assert results.acknowledged > 0, _describe(results)
    assert statuses[412] > 0, _describe(results)
    assert results.outcomes.get("acknowledged after a 412 rebase", 0) > 0, _describe(results)
    assert not [s for s in statuses if s >= 500], _describe(results)
    assert not results.errors
    assert statuses[428] == 0  # every save carried If-Match
    assert results.client["patch_bytes"] < results.client["full_bytes"]
    assert results.latency_ms["save (as the user waited)"]["n"] == results.acknowledged
    assert results.verification.search_seconds is not None
    assert results.verification.markers_checked > 0
    assert results.settle_seconds is not None  # the new pages were indexed before the load
    # one server process: its own histogram saw exactly the PATCHes the users sent
    patches = sum(results.statuses["PATCH page"].values())
    assert results.server_latency_ms["PATCH /pages/{page_id}"]["n"] == patches
    # 8 users: one generator, the main process itself
    [generator] = results.generators
    assert (generator.process, generator.first_user, generator.users) == (0, 0, 8)
    assert generator.acknowledged == results.acknowledged
    assert generator.requests == results.requests


# behaviour of the backends, not of the interpreter: run once, on 3.11 (tox.ini)
@pytest.mark.slow
@pytest.mark.anyio
async def test_two_generator_processes_merge_and_verify(
    serve: Serve, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--processes 2``: each child runs its own users; the main process merges and verifies."""
    base = serve()
    out = tmp_path / "results.json"
    argv = [
        "--url", base, "--users", "6", "--pages", "3", "--blocks", "20",
        "--edits-per-user", "5", "--think", "0", "--shared", "0.5", "--hot-pages", "1",
        "--seed", "5", "--admin-token", ADMIN, "--search-timeout", "20", "--no-progress",
        "--processes", "2", "--json", str(out),
    ]  # fmt: skip
    status = await amain(argv)  # fixed work: 30 edits
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())

    assert status == 0, printed
    assert data["verification"]["ok"], printed
    assert "RESULT: PASS" in printed
    # exactly two generator processes, each with its CPU and event-loop lag
    generators = data["generators"]
    assert data["processes"] == 2
    assert "6 users (2 generator processes)" in printed
    assert [g["process"] for g in generators] == [0, 1]
    for g in generators:
        assert g["cpu_percent"] >= 0.0
        assert g["cpu_seconds"] >= 0.0
        assert set(g["loop_lag_ms"]) == {"p50", "p99", "max"}
        assert f"  process {g['process']} " in printed
    assert set(data["loop_lag_ms"]) == {"p50", "p99", "max"}
    assert isinstance(data["generator_warnings"], list)
    # the users were split into disjoint ranges of global user numbers
    ranges = [range(g["first_user"], g["first_user"] + g["users"]) for g in generators]
    assert ranges == [range(3), range(3, 6)]
    # every edit ended exactly once, in the process that ran its user
    ended = {k: v for k, v in data["outcomes"].items() if "after a 412" not in k}
    assert sum(ended.values()) == 6 * 5, data["outcomes"]
    # the merged acknowledged saves are the children's, summed
    acks = data["acks"]
    assert data["acknowledged"] == len(acks) > 0
    assert sum(g["acknowledged"] for g in generators) == data["acknowledged"]
    assert sum(g["requests"] for g in generators) == data["requests"]
    per_process = Counter(ack["process"] for ack in acks)
    assert [per_process[g["process"]] for g in generators] == [
        g["acknowledged"] for g in generators
    ]
    for ack in acks:
        assert ack["user"] in ranges[ack["process"]], ack
    # markers (which carry the user's number) are unique across processes
    markers = [ack["marker"] for ack in acks if ack["marker"] is not None]
    assert len(markers) == len(set(markers))
    assert data["verification"]["markers_checked"] == len(markers)
    assert data["latency_ms"]["save (as the user waited)"]["n"] == data["acknowledged"]


def _stats(process: int, cpu: float, lag_p99: float | None) -> GeneratorStats:
    return GeneratorStats(
        process=process, first_user=10 * process, users=10, requests=100, acknowledged=20,
        load_seconds=10.0, cpu_seconds=cpu / 10.0, cpu_percent=cpu,
        loop_lag_ms={"p50": 0.1, "p99": lag_p99, "max": lag_p99},
        save_ms={"n": 20, "p50": 5.0, "p95": 9.0, "p99": 9.0, "max": 9.0},
    )  # fmt: skip


def test_generator_warning_rule() -> None:
    """Warn when a generator process used more than half a core or lagged past 20 ms (p99)."""
    assert generator_warnings([_stats(0, 50.0, 20.0), _stats(1, 3.0, None)]) == []
    assert warning_line([]) is None
    reasons = generator_warnings(
        [_stats(0, 50.1, 1.0), _stats(1, 10.0, 20.5), _stats(2, 80.0, 35.0), _stats(3, 0, 0)]
    )
    assert reasons == [
        "generator process 0 used 50.1% of a core",
        "generator process 1 event-loop lag p99 20.5 ms",
        "generator process 2 used 80.0% of a core and event-loop lag p99 35.0 ms",
    ]
    line = warning_line(reasons)
    assert line is not None
    assert line.startswith("WARNING: generator process 0 used 50.1% of a core; ")
    assert line.endswith("the generator may have inflated these latencies; use more --processes")
    assert generator_warnings([_stats(0, 30.0, 5.0)], max_cpu=25.0, max_lag_p99=4.0) == [
        "generator process 0 used 30.0% of a core and event-loop lag p99 5.0 ms"
    ]


def test_users_spread_over_processes() -> None:
    """Contiguous, disjoint user ranges; by default at most 100 users a process, 1 when few."""
    assert split_users(7, 3) == [range(3), range(3, 5), range(5, 7)]
    assert split_users(4, 4) == [range(i, i + 1) for i in range(4)]
    cpus = os.cpu_count() or 1
    assert Options(users=40).generator_processes == 1
    assert Options(users=100).generator_processes == 1
    assert Options(users=500).generator_processes == min(5, cpus)
    assert Options(users=3, processes=8).generator_processes == 3  # never more than the users
    assert parse_args(["--users", "40", "--processes", "2"]).generator_processes == 2
    assert parse_args([]).processes is None


@pytest.mark.anyio
async def test_users_stay_on_a_page(serve: Serve) -> None:
    """``stay``: an editor works on one page, so it opens it once, not once per edit."""
    base = serve()
    options = Options(
        url=base, users=3, pages=4, blocks=10, duration=None, edits_per_user=5, think=0.0,
        shared=0.0, admin_token=ADMIN, seed=11, progress=False, search_timeout=20.0,
        stay=1e9, settle=0.0,
    )  # fmt: skip
    results = await run(options)

    assert results.verification.ok, _describe(results)
    assert results.settle_seconds is None  # not asked to wait
    pages_of: dict[int, set[str]] = {}
    for ack in results.acks:
        pages_of.setdefault(ack.user, set()).add(ack.page_id)
    assert all(len(pages) == 1 for pages in pages_of.values()), pages_of
    ended = sum(n for k, n in results.outcomes.items() if "after a 412" not in k)
    assert ended == 3 * 5, _describe(results)
    # one open per user, and one more only after an edit that did not land (its copy dropped)
    opens = results.latency_ms["open (GET, no local copy)"]["n"]
    assert 3 <= opens <= 3 + (ended - results.acknowledged), _describe(results)


def test_stay_is_at_least_one() -> None:
    """Fewer than one edit per page makes no sense: refused at the command line."""
    with pytest.raises(SystemExit):
        parse_args(["--stay", "0.5"])
    assert parse_args(["--stay", "1"]).stay == 1.0


# behaviour of the backends, not of the interpreter: run once, on 3.11 (tox.ini)
@pytest.mark.slow
@pytest.mark.anyio
async def test_rate_limited_saves_wait_out_429(serve: Serve) -> None:
    """With 5 saves/minute per user, the excess is refused with 429 and users wait."""
    base = serve(SAVE_LIMIT="5/minute")
    options = Options(
        url=base, users=4, pages=2, blocks=10, duration=2.0, think=0.05, shared=0.5,
        admin_token=ADMIN, seed=3, progress=False, max_wait=0.5, grace=1.0,
        search_timeout=20.0,
    )  # fmt: skip
    started = time.monotonic()
    results = await run(options)
    elapsed = time.monotonic() - started

    assert results.verification.ok, _describe(results)
    refused = results.statuses.get("PATCH page", {}).get(429, 0)
    assert refused > 0, _describe(results)
    assert results.client["waits_429"] == refused  # each 429 was counted by its user
    # honoured: a user's next request came no sooner than Retry-After (capped by max_wait)
    assert results.honoured_429 > 0
    assert results.early_429 == 0
    # waiting, not hammering: at most one retry per user per max_wait
    bound = options.users * ((elapsed / options.max_wait) + 2)
    assert refused <= bound, _describe(results)
    per_user = Counter(ack.user for ack in results.acks)
    assert results.acknowledged > 0
    assert max(per_user.values()) <= 5, per_user  # the limit held for every user


def test_edits_only_add() -> None:
    """Edits append text, insert blocks or move them; never remove; markers are indexable."""
    rng = random.Random(1)
    page = make_page(rng, 30)
    kinds: Counter[str] = Counter()
    for n in range(300):
        marker = f"mabcdu1x{n}"
        kind, edited, written, ops = make_edit(rng, page, marker)
        kinds[kind] += 1
        assert apply_patch(page, ops) == edited  # the edit's own patch is exact
        assert len(ops) == 1
        assert {b["id"] for b in page} <= {b["id"] for b in edited}
        before = {b["id"]: b["content"] for b in page}
        for block in edited:
            if block["id"] in before:
                assert block["content"].startswith(before[block["id"]])
        if kind == "move":
            assert written is None
            assert sorted(b["id"] for b in edited) == sorted(b["id"] for b in page)
        else:
            assert written == marker
            assert any(marker in block["content"].split() for block in edited)
        page = edited
    assert set(kinds) == {"append", "insert", "move"}


def test_queue_depth_from_an_exposition() -> None:
    metrics = Metrics()
    metrics.queue_depth("index", "waiting", 7)
    metrics.queue_depth("index", "running", 2)
    metrics.queue_depth("other", "waiting", 99)
    body, _ = metrics.render()
    depth = queue_depth(body.decode())
    assert depth["waiting"] == 7
    assert depth["running"] == 2
    assert sparkline([0, 1, 2, 4], ascii_only=True) == " :=@"


def test_server_latency_from_histogram_deltas() -> None:
    before = {"PATCH /pages/{page_id}": {0.01: 5.0, 0.1: 5.0, math.inf: 5.0}}
    after = {"PATCH /pages/{page_id}": {0.01: 5.0, 0.1: 105.0, math.inf: 115.0}}
    table = server_latency(before, after)
    row = table["PATCH /pages/{page_id}"]
    assert row["n"] == 110
    assert row["p50"] == pytest.approx(10 + 90 * 55 / 100)  # ms, inside the (10, 100] bucket
    assert row["p99"] == 100.0  # past the last finite bound: that bound
    assert table["GET /pages/{page_id}"]["p50"] is None
    assert histogram_quantile(0.5, {}) is None
