"""The ASGI pages service end to end: in process (SQLite + memory, PostgreSQL + Redis), under
real uvicorn, and started by the README's main-job command.

The flow every variant checks: save → 412 on a stale ``If-Match`` → the client rebases and
retries → an indexing job is queued in the save's transaction → the worker processes it → search
finds the new text → the metrics show the save, the conflict and the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from examples.pages_service import __main__ as pages_main
from examples.pages_service.app import create_app
from examples.pages_service.client import Debouncer, PagesClient
from examples.pages_service.store import (
    PageStore,
    Settings,
    SettingsError,
    make_engine,
    process_warnings,
)

from hardening import Metrics
from hardening.adapters.asgi import ASGIApp
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "admin-token-for-the-tests-0123456789"
BLOCKS = [
    {"id": "h", "type": "heading", "content": "Release plan"},
    {"id": "p1", "type": "paragraph", "content": "Ship the first draft"},
    {"id": "p2", "type": "paragraph", "content": "Collect feedback"},
]


@contextlib.asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[None]:
    """Run the app's ASGI lifespan (httpx's transport does not) around the block."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    task = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, outbox.put)
    )
    await inbox.put({"type": "lifespan.startup"})
    assert (await outbox.get())["type"] == "lifespan.startup.complete"
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        assert (await outbox.get())["type"] == "lifespan.shutdown.complete"
        await task


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """A sample's value, or 0 when absent."""
    return metrics.registry.get_sample_value(name, labels) or 0.0


def requests(metrics: Metrics, method: str, route: str, status: int) -> float:
    """How many requests the HTTP histogram counted for a method, route and status."""
    return sample(
        metrics,
        "http_server_request_duration_seconds_count",
        http_request_method=method,
        http_route=route,
        http_response_status_code=str(status),
        error_type="",
    )


@pytest.fixture(
    params=["sqlite-memory", pytest.param("postgres-redis", marks=pytest.mark.postgres)]
)
def backends(request: pytest.FixtureRequest) -> tuple[sa.Engine, Settings]:
    """The database engine and settings: SQLite + in-memory limiter, or PostgreSQL + Redis."""
    if request.param == "sqlite-memory":
        engine = request.getfixturevalue("sqlite_engine")
        return engine, Settings(worker="off", admin_token=ADMIN, save_limit="4/minute")
    engine = request.getfixturevalue("pg_engine")
    request.getfixturevalue("redis_client")  # removes the prefix's keys afterwards
    settings = Settings(
        worker="off",
        admin_token=ADMIN,
        save_limit="4/minute",
        redis_url=request.getfixturevalue("redis_url"),
        key_prefix=request.getfixturevalue("redis_prefix"),
    )
    return engine, settings


@pytest.mark.anyio
async def test_save_conflict_rebase_index_search_metrics(
    backends: tuple[sa.Engine, Settings],
) -> None:
    """The whole page-saving architecture, through the public HTTP API."""
    engine, settings = backends
    metrics = Metrics()
    app = create_app(settings, engine=engine, metrics=metrics)
    transport = httpx.ASGITransport(app=app)
    async with lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        ana, bob = PagesClient(http, user="ana"), PagesClient(http, user="bob")
        page = await ana.create(BLOCKS)
        assert page.version == 1
        got = await http.get(f"/pages/{page.id}")
        assert got.headers["etag"] == '"v1"'
        assert got.json()["blocks"] == BLOCKS

        # bob saves first, from the same version ana holds
        bobs = await bob.open(page.id)
        bob_edit = [*bobs.blocks[:2], {**bobs.blocks[2], "content": "Collect feedback by Friday"}]
        await bob.save(bobs, bob_edit)

        # ana's stale If-Match is refused with 412 ...
        stale = await http.patch(
            f"/pages/{page.id}",
            content=b'[{"op": "replace", "path": "/1/content", "value": "x"}]',
            headers={"content-type": "application/json-patch+json", "if-match": '"v1"'},
        )
        assert stale.status_code == 412
        assert stale.headers["content-type"] == "application/problem+json"
        assert stale.json()["current_etag"] == '"v2"'

        # ... and her client rebases onto bob's version and retries
        ana_edit = [BLOCKS[0], {**BLOCKS[1], "content": "Ship the zeppelin draft"}, BLOCKS[2]]
        saved = await ana.save(page, ana_edit)
        assert saved.version == 3
        assert ana.stats.retries_412 == 1
        assert ana.stats.caught_up == 1  # bob's patch since v1, not the whole page
        final = (await http.get(f"/pages/{page.id}")).json()
        assert final["blocks"][1]["content"] == "Ship the zeppelin draft"
        assert final["blocks"][2]["content"] == "Collect feedback by Friday"  # bob's kept

        # the creation and each save queued an indexing job in their transactions (the
        # refused 412 did not): the page's words, then each save's changed blocks
        store: PageStore = app_store(app)
        assert store.indexer.stats().waiting == 3
        assert store.indexer.run_until_empty() == 3
        found = (await http.get("/search", params={"q": "zeppelin"})).json()["results"]
        assert [hit["id"] for hit in found] == [page.id]
        assert store.indexed_version(page.id) == 3

        # every old version can be rebuilt
        first = (await http.get(f"/pages/{page.id}/versions/1")).json()
        assert first["blocks"] == BLOCKS
        assert first["version"] == 1

    route = "/pages/{page_id}"
    assert requests(metrics, "PATCH", route, 200) == 2
    assert requests(metrics, "PATCH", route, 412) == 2  # ours, and the client's first try
    assert requests(metrics, "POST", "/pages", 201) == 1
    assert sample(metrics, "hardening_jobs_total", queue="index", outcome="completed") == 3
    assert sample(metrics, "hardening_patch_operations_count") == 2
    assert (
        sample(metrics, "hardening_rate_limit_decisions_total", limiter="saves", outcome="allowed")
        >= 3
    )


def app_store(app: ASGIApp) -> PageStore:
    """The store behind a ``create_app`` stack (down the middleware's ``.app`` chain)."""
    inner: Any = app
    while not hasattr(inner, "state"):
        inner = inner.app
    store: PageStore = inner.state.store
    return store


@pytest.mark.anyio
async def test_http_errors_are_problem_json(sqlite_engine: sa.Engine) -> None:
    """428 without If-Match, 415 + Accept-Patch, 400 malformed, 422 bad op, 404, 413, 304."""
    app = create_app(Settings(worker="off"), engine=sqlite_engine, metrics=Metrics())
    transport = httpx.ASGITransport(app=app)
    async with lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        page = await PagesClient(http).create(BLOCKS)
        url, patch_type = f"/pages/{page.id}", "application/json-patch+json"
        missing = await http.patch(url, content=b"[]", headers={"content-type": patch_type})
        assert missing.status_code == 428
        wrong_type = await http.patch(
            url, content=b"[]", headers={"content-type": "application/json", "if-match": '"v1"'}
        )
        assert wrong_type.status_code == 415
        assert wrong_type.headers["accept-patch"] == patch_type
        malformed = await http.patch(
            url, content=b"[{", headers={"content-type": patch_type, "if-match": '"v1"'}
        )
        assert malformed.status_code == 400
        bad_op = await http.patch(
            url,
            content=b'[{"op": "replace", "path": "/9/content", "value": "x"}]',
            headers={"content-type": patch_type, "if-match": '"v1"'},
        )
        assert bad_op.status_code == 422
        assert bad_op.json()["op_index"] == 0
        breaks_shape = await http.patch(
            url,
            content=b'[{"op": "add", "path": "/0/extra", "value": 1}]',
            headers={"content-type": patch_type, "if-match": '"v1"'},
        )
        assert breaks_shape.status_code == 422
        assert (await http.get("/pages/nope")).status_code == 404
        huge = await http.post("/pages", content=b"x" * (9 * 1024 * 1024))
        assert huge.status_code == 413
        cached = await http.get(url, headers={"if-none-match": '"v1"'})
        assert cached.status_code == 304
        assert (await http.get(url)).json()["version"] == 1  # nothing above changed it


@pytest.mark.anyio
async def test_put_is_stored_as_a_patch(sqlite_engine: sa.Engine) -> None:
    """A full save is diffed server-side: small patch rows, old versions rebuildable."""
    app = create_app(Settings(worker="off"), engine=sqlite_engine, metrics=Metrics())
    transport = httpx.ASGITransport(app=app)
    async with lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        page = await PagesClient(http).create(BLOCKS)
        moved = [BLOCKS[2], BLOCKS[0], {**BLOCKS[1], "content": "Ship it"}]
        put = await http.put(
            f"/pages/{page.id}", json={"blocks": moved}, headers={"if-match": '"v1"'}
        )
        assert put.status_code == 200
        assert put.headers["etag"] == '"v2"'
        stale = await http.put(
            f"/pages/{page.id}", json={"blocks": BLOCKS}, headers={"if-match": '"v1"'}
        )
        assert stale.status_code == 412
        assert (await http.get(f"/pages/{page.id}")).json()["blocks"] == moved
        assert (await http.get(f"/pages/{page.id}/versions/1")).json()["blocks"] == BLOCKS
    with sqlite_engine.connect() as connection:
        patch = connection.execute(
            sa.text("SELECT patch FROM hardening_block_patches WHERE version = 2")
        ).scalar_one()
    assert len(str(patch)) < 200  # a move and a replace, not the page


@pytest.mark.anyio
async def test_saves_are_limited_per_user_and_admin_bypasses(sqlite_engine: sa.Engine) -> None:
    """30/minute per user in production; here 4: the 5th save is a 429 with Retry-After."""
    settings = Settings(worker="off", admin_token=ADMIN, save_limit="4/minute")
    app = create_app(settings, engine=sqlite_engine, metrics=Metrics())
    transport = httpx.ASGITransport(app=app)
    async with lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        creator = PagesClient(http, token=ADMIN)
        page = await creator.create(BLOCKS)
        body, version = b'[{"op": "replace", "path": "/0/content", "value": "v"}]', 1
        statuses = []
        for _ in range(5):
            headers = {
                "content-type": "application/json-patch+json",
                "if-match": f'"v{version}"',
                "x-user": "eve",
            }
            response = await http.patch(f"/pages/{page.id}", content=body, headers=headers)
            statuses.append(response.status_code)
            if response.status_code == 200:
                version += 1
        assert statuses == [200, 200, 200, 200, 429]
        assert int(response.headers["retry-after"]) >= 59  # block_for 60 s
        other = await http.patch(
            f"/pages/{page.id}",
            content=body,
            headers={**headers, "x-user": "mallory", "if-match": f'"v{version}"'},
        )
        assert other.status_code == 200  # per user, not global
        admin = await http.patch(
            f"/pages/{page.id}",
            content=body,
            headers={
                **headers,
                "authorization": f"Bearer {ADMIN}",
                "if-match": f'"v{version + 1}"',
            },
        )
        assert admin.status_code == 200


@pytest.mark.anyio
async def test_debounced_client_sends_one_patch(sqlite_engine: sa.Engine) -> None:
    """Rapid edits collapse into one save after the quiet period."""
    app = create_app(Settings(worker="off"), engine=sqlite_engine, metrics=Metrics())
    transport = httpx.ASGITransport(app=app)
    async with lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        client = PagesClient(http, user="ana")
        page = await client.create(BLOCKS)
        editor = Debouncer(client, page, delay=0.05)
        for word in ("one", "two", "three"):
            editor.edit(lambda blocks, w=word: [{**blocks[0], "content": w}, *blocks[1:]])
        saved = await editor.flush()
        assert saved.version == 2
        assert client.stats.saves == 1
        assert (await http.get(f"/pages/{page.id}")).json()["blocks"][0]["content"] == "three"


# --- real servers ---------------------------------------------------------------------------


def _pythonpath() -> list[str]:
    inherited = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    return [str(ROOT), *(os.path.abspath(path) for path in inherited if path)]


@contextlib.contextmanager
def serve(command: list[str], env: dict[str, str], port: int, cwd: Path) -> Iterator[str]:
    """Run a server command until its /healthz answers; stop it (SIGINT) afterwards."""
    log = cwd / f"server-{port}.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            # the caller's PYTHONPATH stays after ROOT: a worktree's src/ over an installed copy
            env={**os.environ, **env, "PYTHONPATH": os.pathsep.join(_pythonpath())},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("server did not become healthy in 30 s")
            time.sleep(0.1)
        yield base
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def flow_over_http(base: str) -> None:
    """Save, conflict, rebase, and wait for the in-process worker to index."""
    async with httpx.AsyncClient(base_url=base) as http:
        ana, bob = PagesClient(http, user="ana"), PagesClient(http, user="bob")
        page = await ana.create(BLOCKS)
        bobs = await bob.open(page.id)
        await bob.save(bobs, [*bobs.blocks, {"id": "p3", "type": "paragraph", "content": "b"}])
        saved = await ana.save(page, [{**BLOCKS[0], "content": "Release quokka"}, *BLOCKS[1:]])
        assert saved.version == 3
        assert ana.stats.retries_412 == 1
        assert ana.stats.caught_up == 1  # bob's patch since v1, not the whole page
        for _ in range(100):  # the in-process worker indexes within moments
            results = (await http.get("/search", params={"q": "quokka"})).json()["results"]
            if results:
                break
            await asyncio.sleep(0.1)
        assert [hit["id"] for hit in results] == [page.id]
        completed = re.compile(r'hardening_jobs_total\{outcome="completed",queue="index"\} [1-9]')
        for _ in range(100):  # the job is counted when its ack goes out, just after the commit
            scrape = (await http.get("/metrics")).text
            if completed.search(scrape):
                break
            await asyncio.sleep(0.1)
        assert re.search(r'http_route="/pages/\{page_id\}".*} [1-9]', scrape)
        assert 'http_response_status_code="412"' in scrape
        assert completed.search(scrape)


def test_under_uvicorn(tmp_path: Path) -> None:
    """The service behind real uvicorn on loopback, worker in process."""
    port = free_port()
    env = {"DATABASE_URL": f"sqlite:///{tmp_path}/pages.db", "PORT": str(port)}
    command = [sys.executable, "-m", "examples.pages_service"]
    with serve(command, env, port, tmp_path) as base:
        asyncio.run(flow_over_http(base))


def readme_main_command() -> str:
    """The README's first command, after its ``pip install`` part."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## The two commands", 1)[1].split("```console", 1)[1]
    first = next(line for line in block.splitlines() if line and not line.startswith("#"))
    install, _, run = first.partition("&&")
    assert install.strip().startswith("pip install"), first
    return run.strip()


def test_readme_main_command_serves(tmp_path: Path) -> None:
    """The README's main-job command starts the service on embedded defaults and it serves."""
    command = readme_main_command()
    assert command == "python -m examples.pages_service"
    port = free_port()
    # run from a scratch directory so the default SQLite file lands there, not in the repo
    with serve([sys.executable, *command.split()[1:]], {"PORT": str(port)}, port, tmp_path) as base:
        asyncio.run(flow_over_http(base))
    assert (tmp_path / "pages.db").exists()


def test_settings_from_env() -> None:
    """Configuration comes only from the environment, with embedded defaults."""
    defaults = Settings.from_env({})
    assert (defaults.database_url, defaults.redis_url, defaults.worker) == (
        "sqlite:///pages.db",
        None,
        "inprocess",
    )
    custom = Settings.from_env(
        {
            "DATABASE_URL": "postgresql+psycopg://app:secret@db/app",
            "REDIS_URL": "redis://:pw@cache:6379/0",
            "ADMIN_TOKEN": ADMIN,
            "WORKER_MODE": "external",
            "TRUSTED_PROXIES": "10.0.0.0/8, 127.0.0.1",
            "API_TOKENS": "t1:alice:pro,t2:bob",
        }
    )
    assert custom.trusted_proxies == ("10.0.0.0/8", "127.0.0.1")
    assert custom.api_tokens == {"t1": ("alice", "pro"), "t2": ("bob", "free")}
    described = custom.describe()
    assert "secret" not in described
    assert "pw@" not in described
    assert ADMIN not in described
    with pytest.raises(ValueError, match="WORKER_MODE"):
        Settings.from_env({"WORKER_MODE": "sometimes"})


def test_short_admin_token_is_refused_naming_the_fix() -> None:
    """An ADMIN_TOKEN under 16 characters is a settings error that says how to make one."""
    with pytest.raises(SettingsError, match=r"ADMIN_TOKEN must be at least 16 .*token_urlsafe"):
        Settings.from_env({"ADMIN_TOKEN": "too-short"})
    assert Settings.from_env({"ADMIN_TOKEN": "x" * 16}).admin_token == "x" * 16


def test_main_exits_2_with_one_line_for_a_bad_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A short ADMIN_TOKEN stops ``python -m examples.pages_service`` before uvicorn starts:
    one line on stderr naming the fix, exit status 2, no traceback."""
    monkeypatch.setenv("ADMIN_TOKEN", "short")
    monkeypatch.setattr(pages_main.uvicorn, "run", pytest.fail)
    with pytest.raises(SystemExit) as exit_info:
        pages_main.main([])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "Traceback" not in error
    assert error.startswith("python -m examples.pages_service: error: ADMIN_TOKEN must be")


def test_process_warnings_name_the_fix() -> None:
    """Several workers without PROMETHEUS_MULTIPROC_DIR (or REDIS_URL) are each warned about."""
    assert process_warnings(1, {}) == []
    shared = {"REDIS_URL": "redis://cache", "PROMETHEUS_MULTIPROC_DIR": "/tmp/metrics"}
    assert process_warnings(4, shared) == []
    (metrics_warning,) = process_warnings(2, {"REDIS_URL": "redis://cache"})
    assert metrics_warning.startswith("2 workers without PROMETHEUS_MULTIPROC_DIR")
    assert "set PROMETHEUS_MULTIPROC_DIR to an empty directory" in metrics_warning
    assert len(process_warnings(2, {})) == 2


def test_main_warns_once_and_wipes_the_multiprocess_dir(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """``--workers 2`` without PROMETHEUS_MULTIPROC_DIR logs the warning once; with it, the
    directory is emptied before uvicorn starts its workers, and nothing is warned."""
    runs: list[dict[str, Any]] = []
    monkeypatch.setattr(pages_main.uvicorn, "run", lambda app, **options: runs.append(options))
    monkeypatch.delenv("ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    with caplog.at_level(logging.WARNING, logger="pages_service"):
        pages_main.main(["--workers", "2"])
    messages = [record.getMessage() for record in caplog.records]
    warnings = [message for message in messages if "PROMETHEUS_MULTIPROC_DIR" in message]
    assert len(warnings) == 1
    assert warnings[0].startswith("2 workers without")
    assert runs[-1]["workers"] == 2

    caplog.clear()
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_123.db").write_bytes(b"an earlier run")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    with caplog.at_level(logging.WARNING, logger="pages_service"):
        pages_main.main(["--workers", "2"])
    assert caplog.records == []
    assert list(directory.iterdir()) == []


def test_engine_for_sqlite_uses_wal(tmp_path: Path) -> None:
    """The SQLite engine the service builds is safe for a web process and a worker thread."""
    engine = make_engine(f"sqlite:///{tmp_path}/pages.db")
    try:
        with engine.connect() as connection:
            assert connection.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"
    finally:
        engine.dispose()


@pytest.mark.anyio
async def test_windows_incremental_index_and_snapshot_jobs(
    backends: tuple[sa.Engine, Settings],
) -> None:
    """A page reads a window at a time; a save's job re-indexes only the blocks it changed;
    a save that leaves a snapshot due queues the job that writes it."""
    engine, settings = backends
    settings = dataclasses.replace(settings, save_limit="1000/minute")  # 22 saves here
    app = create_app(settings, engine=engine, metrics=Metrics())
    transport = httpx.ASGITransport(app=app)
    blocks = [{"id": f"b{i}", "type": "paragraph", "content": f"word{i} common"} for i in range(25)]
    async with lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        client = PagesClient(http, user="ana")
        page = await client.create(blocks)
        store: PageStore = app_store(app)
        store.indexer.run_until_empty()

        seen, after = [], None
        while True:
            params = {"limit": "10", **({"after": after} if after else {})}
            window = (await http.get(f"/pages/{page.id}", params=params)).json()
            assert (window["version"], window["total"]) == (1, 25)
            seen += [block["id"] for block in window["blocks"]]
            after = window["next_after"]
            if after is None:
                break
        assert seen == [block["id"] for block in blocks]
        for bad in ({"limit": "0"}, {"limit": "x"}, {"limit": "5", "after": "0"}):
            answer = await http.get(f"/pages/{page.id}", params=bad)
            assert answer.status_code == 400, bad

        edited = [*blocks[:3], {**blocks[3], "content": "zeppelin"}, *blocks[4:]]
        local = await client.save(page, edited)
        (job,) = store.jobs.claim("index", worker="test", limit=5, lease=30)
        assert job.payload == {"page_id": page.id, "action": "index", "block_ids": ["b3"]}
        store.jobs.release(job)
        store.indexer.run_until_empty()
        hits = (await http.get("/search", params={"q": "zeppelin"})).json()["results"]
        assert hits == [{"id": page.id, "hits": 1}]
        assert (await http.get("/search", params={"q": "word3"})).json()["results"] == []
        common = (await http.get("/search", params={"q": "common"})).json()["results"]
        assert common == [{"id": page.id, "hits": 24}]  # the other blocks' words untouched

        for step in range(20):  # the 20th save since the snapshot leaves one due
            edited = [{**edited[0], "content": f"step{step}"}, *edited[1:]]
            local = await client.save(local, edited)
        assert store.indexer.run_until_empty() == 21  # 20 index jobs and one snapshot job
        assert store.history.snapshot(page.id) is None  # written by the job: none due now
        rebuilt = (await http.get(f"/pages/{page.id}/versions/{local.version - 1}")).json()
        assert rebuilt["blocks"][0]["content"] == "step18"


@pytest.mark.anyio
async def test_patches_since_a_version(sqlite_engine: sa.Engine) -> None:
    """``GET /pages/{id}/patches?since=n`` gives the saves since n; what the server cannot
    give (past the head, a bad number) is a 404 or 400, and the client then reloads."""
    app = create_app(Settings(worker="off"), engine=sqlite_engine, metrics=Metrics())
    transport = httpx.ASGITransport(app=app)
    async with lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        client = PagesClient(http)
        page = await client.create(BLOCKS)
        edited = [{**BLOCKS[0], "content": "one"}, *BLOCKS[1:]]
        second = await client.save(page, edited)
        third = await client.save(second, [*edited, {**BLOCKS[0], "id": "x"}])
        answer = await http.get(f"/pages/{page.id}/patches", params={"since": "1"})
        assert answer.status_code == 200
        body = answer.json()
        assert (body["version"], len(body["patches"]), answer.headers["etag"]) == (3, 2, '"v3"')
        caught_up, patches = await client.catch_up(page)
        assert (caught_up.version, caught_up.blocks, patches) == (3, third.blocks, body["patches"])
        since_head = await http.get(f"/pages/{page.id}/patches", params={"since": "3"})
        assert since_head.json()["patches"] == []
        for since, status in (("4", 404), ("-1", 400), ("x", 400), ("", 400)):
            got = await http.get(f"/pages/{page.id}/patches", params={"since": since})
            assert got.status_code == status, since
        stale = await client.catch_up(dataclasses.replace(page, version=9))  # not on the server
        assert (stale[0].version, stale[0].blocks) == (3, third.blocks)  # reloaded whole
