"""``examples/loadtest.py`` against the real pages service (uvicorn subprocess, SQLite file).

Small runs: users race on a hot page, so saves meet 412s, rebase and land; afterwards every
acknowledged marker is on its page, versions count the acknowledged saves, and search finds
each page's newest marker. With a tiny save limit, 429s are counted and waited out.
"""

from __future__ import annotations

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
    Options,
    Results,
    histogram_quantile,
    make_edit,
    make_page,
    queue_depth,
    run,
    server_latency,
    sparkline,
)

from hardening import Metrics
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
    # one server process: its own histogram saw exactly the PATCHes the users sent
    patches = sum(results.statuses["PATCH page"].values())
    assert results.server_latency_ms["PATCH /pages/{page_id}"]["n"] == patches


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
        kind, edited, written = make_edit(rng, page, marker)
        kinds[kind] += 1
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
