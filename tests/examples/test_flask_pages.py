"""The Flask (WSGI) pages service end to end: in process on SQLite + memory and on PostgreSQL +
Redis, with its in-process worker thread, and under a real gunicorn.

The flow: create → GET with ETag (304 on If-None-Match) → PATCH with If-Match → 412 on a stale
one → the client rebases its patch onto the fresh copy and retries → the indexing job queued in
the save's transaction is processed → search finds the new text → /metrics shows the saves, the
conflict, the job and the rate-limit decisions by route template.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from examples.flask_pages import __main__ as flask_main
from examples.flask_pages.__main__ import APP, CONFIG, gunicorn_argv, main
from examples.flask_pages.app import PagesService, create_app, pages_service
from examples.pages_service.store import Settings
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from hardening import UNMATCHED_ROUTE, diff_blocks, rebase
from tests.conftest import free_port, gunicorn_options

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "an-admin-token-of-32-characters!"
PATCH_TYPE = "application/json-patch+json"
ROUTE = "/pages/<page_id>"
BLOCKS = [
    {"id": "h", "type": "heading", "content": "Release plan"},
    {"id": "p1", "type": "paragraph", "content": "Ship the first draft"},
    {"id": "p2", "type": "paragraph", "content": "Collect feedback"},
]


@dataclass
class Pages:
    """A ``create_app`` app and an httpx client calling it in process."""

    app: Flask
    service: PagesService
    http: httpx.Client
    redis: Any = None  # the test's Redis client (PostgreSQL + Redis only)
    redis_prefix: str = ""

    def create(self, blocks: list[dict[str, str]] = BLOCKS, user: str | None = None) -> str:
        headers = {"X-User": user} if user else {}
        response = self.http.post("/pages", json={"blocks": blocks}, headers=headers)
        assert response.status_code == 201, response.text
        page_id: str = response.json()["id"]
        return page_id

    def patch(self, page_id: str, ops: object, if_match: str | None, **headers: str) -> Any:
        if if_match is not None:
            headers["If-Match"] = if_match
        return self.http.patch(
            f"/pages/{page_id}",
            content=json.dumps(ops).encode(),
            headers={"Content-Type": PATCH_TYPE, **headers},
        )


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "worker": "off",
        "admin_token": ADMIN,
        "api_tokens": {"pro-token": ("carol", "pro")},
        **overrides,
    }
    return Settings(**values)


@pytest.fixture(
    params=[
        "sqlite-memory",
        pytest.param("postgres-redis", marks=[pytest.mark.postgres, pytest.mark.redis]),
    ]
)
def backend(request: pytest.FixtureRequest) -> tuple[sa.Engine, dict[str, Any], Any, str]:
    """SQLite with in-memory limits, or PostgreSQL (a schema of the test's own) with Redis."""
    if request.param == "sqlite-memory":
        return request.getfixturevalue("sqlite_engine"), {}, None, ""
    engine = request.getfixturevalue("pg_engine")
    redis_client = request.getfixturevalue("redis_client")  # drops the prefix's keys after
    prefix = request.getfixturevalue("redis_prefix")
    overrides = {"redis_url": request.getfixturevalue("redis_url"), "key_prefix": prefix}
    return engine, overrides, redis_client, prefix


@pytest.fixture
def make_pages(
    backend: tuple[sa.Engine, dict[str, Any], Any, str],
) -> Iterator[Callable[..., Pages]]:
    """Build the app on the backend with some settings, and an httpx client calling it."""
    engine, backend_settings, redis_client, prefix = backend
    made: list[Pages] = []

    def make(**overrides: Any) -> Pages:
        app = create_app(settings(**backend_settings, **overrides), engine=engine)
        http = httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://pages.test")
        made.append(Pages(app, pages_service(app), http, redis_client, prefix))
        return made[-1]

    try:
        yield make
    finally:
        for pages in made:
            pages.http.close()
            pages.service.close()


@pytest.fixture
def pages(make_pages: Callable[..., Pages]) -> Pages:
    """The app with a roomy save limit."""
    return make_pages(save_limit="100/minute")


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(http: httpx.Client) -> Samples:
    response = http.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


def requests_seen(samples: Samples, method: str, route: str, status: int) -> float:
    return value(
        samples,
        "http_server_request_duration_seconds_count",
        http_request_method=method,
        http_route=route,
        http_response_status_code=str(status),
    )


# --- in process ------------------------------------------------------------------------------


def test_save_conflict_rebase_index_search_metrics(pages: Pages) -> None:
    """The page-saving architecture through the HTTP API, on both storage stacks."""
    http, store = pages.http, pages.service.store
    created = http.post("/pages", json={"blocks": BLOCKS}, headers={"X-User": "ana"})
    assert created.status_code == 201
    assert created.headers["ETag"] == '"v1"'
    page_id = created.json()["id"]
    assert created.headers["Location"] == f"/pages/{page_id}"
    url = f"/pages/{page_id}"

    got = http.get(url)
    assert got.headers["ETag"] == '"v1"'
    assert got.json() == {"id": page_id, "version": 1, "blocks": BLOCKS}
    cached = http.get(url, headers={"If-None-Match": '"v1"'})
    assert cached.status_code == 304
    assert cached.headers["ETag"] == '"v1"'
    assert cached.content == b""

    # ana and bob both hold v1; bob saves first
    base = got.json()["blocks"]
    bobs = [*base[:2], {**base[2], "content": "Collect feedback by Friday"}]
    saved = pages.patch(page_id, diff_blocks(base, bobs), '"v1"', **{"X-User": "bob"})
    assert saved.status_code == 200, saved.text
    assert saved.headers["ETag"] == '"v2"'

    # ana's patch, written against v1, is refused ...
    anas = [base[0], {**base[1], "content": "Ship the zeppelin draft"}, base[2]]
    my_patch = diff_blocks(base, anas)
    stale = pages.patch(page_id, my_patch, '"v1"', **{"X-User": "ana"})
    assert stale.status_code == 412
    assert stale.headers["Content-Type"] == "application/problem+json"
    assert stale.json()["current_etag"] == '"v2"'

    # ... so her client refetches, rebases onto bob's save and retries
    fresh = http.get(url)
    head_patches = [diff_blocks(base, fresh.json()["blocks"])]
    rebased = rebase(my_patch, base=base, head_patches=head_patches)
    retried = pages.patch(page_id, rebased, fresh.headers["ETag"], **{"X-User": "ana"})
    assert retried.status_code == 200, retried.text
    assert retried.headers["ETag"] == '"v3"'
    assert retried.json() == {"id": page_id, "version": 3}  # the page only if asked for
    assert http.get(url).json()["blocks"] == [base[0], anas[1], bobs[2]]  # both edits kept

    # the creation and the two saves each queued an indexing job (the 412 did not): the
    # page's words, then each save's changed blocks only
    assert store.indexed_version(page_id) is None
    assert store.indexer.stats().waiting == 3
    assert store.indexer.run_until_empty() == 3
    assert store.indexed_version(page_id) == 3
    found = http.get("/search", params={"q": "Zeppelin friday"}).json()
    assert found == {"query": "Zeppelin friday", "results": [{"id": page_id, "hits": 2}]}
    assert http.get("/search", params={"q": "first"}).json()["results"] == []  # replaced text

    samples = scrape(http)
    assert requests_seen(samples, "POST", "/pages", 201) == 1
    assert (
        requests_seen(samples, "GET", ROUTE, 200) == 3
    )  # the first read, the refetch after 412, the check of both edits
    assert requests_seen(samples, "GET", ROUTE, 304) == 1
    assert requests_seen(samples, "PATCH", ROUTE, 200) == 2
    assert requests_seen(samples, "PATCH", ROUTE, 412) == 1
    assert requests_seen(samples, "GET", "/search", 200) == 2
    assert not any(page_id in labels for _, ls in samples for labels in dict(ls).values())
    assert value(samples, "hardening_jobs_total", queue="index", outcome="completed") == 3
    assert value(samples, "hardening_patch_operations_count") == 2
    saves_allowed = value(
        samples, "hardening_rate_limit_decisions_total", limiter="saves", outcome="allowed"
    )
    assert saves_allowed == 4  # the create and three patches; GETs are not saves
    assert (
        value(samples, "hardening_rate_limit_decisions_total", limiter="per_ip", outcome="allowed")
        >= 8
    )

    health = http.get("/healthz")
    assert health.status_code == 200
    checks = health.json()["checks"]
    assert checks["database"]["status"] == "ok"
    if pages.redis is not None:
        assert checks["redis"]["status"] == "ok"
        # the limits were counted in Redis, under the test's prefix
        assert list(pages.redis.scan_iter(match=f"{pages.redis_prefix}*"))
    else:
        assert set(checks) == {"database"}
    assert requests_seen(scrape(http), "GET", "/healthz", 200) == 1


def test_http_errors_are_problem_json(pages: Pages) -> None:
    """428, 415 with Accept-Patch, 400, 422, 412 on a malformed tag, 404, 413."""
    page_id = pages.create()
    missing = pages.patch(page_id, [], None)
    assert missing.status_code == 428
    assert missing.headers["Content-Type"] == "application/problem+json"
    assert missing.json()["header"] == "If-Match"

    wrong_type = pages.http.patch(
        f"/pages/{page_id}",
        content=b"[]",
        headers={"Content-Type": "application/json", "If-Match": '"v1"'},
    )
    assert wrong_type.status_code == 415
    assert PATCH_TYPE in wrong_type.headers["Accept-Patch"]

    malformed = pages.http.patch(
        f"/pages/{page_id}", content=b"[{", headers={"Content-Type": PATCH_TYPE, "If-Match": '"v1"'}
    )
    assert malformed.status_code == 400
    assert malformed.headers["Content-Type"] == "application/problem+json"

    bad_op = pages.patch(page_id, [{"op": "frobnicate", "path": "/0"}], '"v1"')
    assert bad_op.status_code == 422
    assert bad_op.json()["op_index"] == 0
    missing_block = pages.patch(
        page_id, [{"op": "replace", "path": "/9/content", "value": "x"}], '"v1"'
    )
    assert missing_block.status_code == 422
    breaks_shape = pages.patch(page_id, [{"op": "remove", "path": "/0/type"}], '"v1"')
    assert breaks_shape.status_code == 422  # applies, but leaves an invalid page: rolled back

    weak = pages.patch(page_id, [], 'W/"v1"')
    assert weak.status_code == 412
    assert weak.json()["reason"] == "malformed"

    assert pages.http.get("/pages/nope").status_code == 404
    assert pages.patch("nope", [], '"v1"').status_code == 404
    versions = f"/pages/{page_id}/versions"
    for number in (0, 7, 10**12, 2**63, 10**30):  # past the head: 404 at once, never rebuilt
        assert pages.http.get(f"{versions}/{number}").status_code == 404
    assert pages.http.post("/pages", json={"nope": []}).status_code == 400
    assert pages.http.post("/pages", json={"blocks": [{"id": "x"}]}).status_code == 400
    huge = pages.http.post(
        "/pages", content=b"x" * (9 * 1024 * 1024), headers={"Content-Type": "application/json"}
    )
    assert huge.status_code == 413

    page = pages.http.get(f"/pages/{page_id}").json()
    assert page["version"] == 1  # nothing above changed it
    assert pages.service.store.indexer.stats().waiting == 1  # nor queued a job


def test_put_is_stored_as_a_patch(pages: Pages) -> None:
    """A full save is diffed on the server: a small patch, old versions rebuildable."""
    page_id = pages.create()
    url = f"/pages/{page_id}"
    moved = [BLOCKS[2], BLOCKS[0], {**BLOCKS[1], "content": "Ship it"}]
    put = pages.http.put(
        url,
        json={"blocks": moved},
        headers={"If-Match": '"v1"', "Prefer": "return=representation"},
    )
    assert put.status_code == 200, put.text
    assert put.headers["ETag"] == '"v2"'
    assert put.json()["blocks"] == moved

    same = pages.http.put(url, json={"blocks": moved}, headers={"If-Match": '"v2"'})
    assert same.status_code == 200
    assert same.headers["ETag"] == '"v2"'  # nothing changed, nothing saved
    stale = pages.http.put(url, json={"blocks": BLOCKS}, headers={"If-Match": '"v1"'})
    assert stale.status_code == 412
    assert pages.http.put(url, json={"blocks": BLOCKS}).status_code == 428

    first = pages.http.get(f"{url}/versions/1")
    assert first.status_code == 200
    assert first.json() == {"id": page_id, "version": 1, "blocks": BLOCKS}
    assert first.headers["ETag"] == '"v1"'
    assert pages.http.get(f"{url}/versions/2").json()["blocks"] == moved

    samples = scrape(pages.http)
    assert value(samples, "hardening_patch_operations_count") == 1
    assert (
        value(samples, "hardening_patch_operations_sum")
        == len(
            diff_blocks(BLOCKS, moved, guards=True)  # the server guards its own diff: ids, no scans
        )
        == 4
    )
    assert requests_seen(samples, "GET", "/pages/<page_id>/versions/<int:number>", 200) == 2
    assert requests_seen(samples, "PUT", ROUTE, 412) == 1


def test_saves_are_limited_per_user_with_tiers_and_admin_bypass(
    make_pages: Callable[..., Pages],
) -> None:
    """3 saves a minute per user here (SAVE_LIMIT): the 4th is a 429 with Retry-After."""
    pages = make_pages(save_limit="3/minute")
    page_id = pages.create(user="eve")
    ops = [{"op": "replace", "path": "/0/content", "value": "v"}]
    statuses = []
    version = 1
    for _ in range(3):
        response = pages.patch(page_id, ops, f'"v{version}"', **{"X-User": "eve"})
        statuses.append(response.status_code)
        version += response.status_code == 200
    assert statuses == [200, 200, 429]
    assert response.headers["Content-Type"] == "application/problem+json"
    assert int(response.headers["Retry-After"]) >= 59  # SAVE_BLOCK_FOR: blocked for 60 s
    assert response.json()["status"] == 429
    assert pages.http.get(f"/pages/{page_id}").json()["version"] == 3  # the 429 saved nothing
    assert pages.http.get(f"/pages/{page_id}", headers={"X-User": "eve"}).status_code == 200

    other = pages.patch(page_id, ops, f'"v{version}"', **{"X-User": "mallory"})
    assert other.status_code == 200  # per user, not global
    assert other.headers["X-RateLimit-Limit"] == "3"
    version += 1

    for admin in ({"X-RateLimit-Bypass": ADMIN}, {"Authorization": f"Bearer {ADMIN}"}):
        bypassed = pages.patch(page_id, ops, f'"v{version}"', **{"X-User": "eve", **admin})
        assert bypassed.status_code == 200
        assert "X-RateLimit-Limit" not in bypassed.headers
        version += 1

    pro = pages.patch(page_id, ops, f'"v{version}"', Authorization="Bearer pro-token")
    assert pro.status_code == 200
    assert pro.headers["X-RateLimit-Limit"] == "15"  # the pro tier: 5 x 3

    samples = scrape(pages.http)
    # the limiter answers before Flask routes the request: its 429s have no route template
    assert requests_seen(samples, "PATCH", UNMATCHED_ROUTE, 429) == 1
    refused = {
        outcome: value(
            samples, "hardening_rate_limit_decisions_total", limiter="saves", outcome=outcome
        )
        for outcome in ("denied", "blocked")
    }
    assert refused == {"denied": 0, "blocked": 1}  # with block_for, a refusal starts a block
    assert pages.http.get("/metrics").headers.get("X-RateLimit-Limit") is None  # exempt


def running(service: PagesService) -> bool:
    """Whether the service's indexing thread runs (a call: mypy would narrow the property)."""
    return service.worker_running


def test_inprocess_worker_thread_indexes_and_stops(tmp_path: Path) -> None:
    """WORKER_MODE=inprocess: create_app starts the thread, close() stops it promptly."""
    database = f"sqlite:///{tmp_path / 'pages.db'}"
    app = create_app(Settings(database_url=database, worker="inprocess"))
    service = pages_service(app)
    try:
        assert running(service)
        assert not service.start_worker()  # one per process
        with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t") as http:
            page_id = pages_create(http, "a platypus appears")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                results = http.get("/search", params={"q": "platypus"}).json()["results"]
                if results:
                    break
                time.sleep(0.02)
            assert [hit["id"] for hit in results] == [page_id]
    finally:
        started = time.monotonic()
        service.close()
    assert time.monotonic() - started < 5
    assert not running(service)
    service.close()  # idempotent
    assert not service.start_worker()  # closed for good


def test_worker_stopped_right_after_start_still_stops(tmp_path: Path) -> None:
    """A stop that lands before the thread's run() has begun is not lost."""
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'p.db'}", worker="inprocess"))
    started = time.monotonic()
    pages_service(app).close()
    assert time.monotonic() - started < 5


def test_worker_off_and_deferred(tmp_path: Path, sqlite_engine: sa.Engine) -> None:
    off = pages_service(create_app(Settings(worker="off"), engine=sqlite_engine))
    assert not off.start_worker()
    off.close()
    deferred_app = create_app(
        Settings(worker="inprocess"), engine=sqlite_engine, start_worker=False
    )
    deferred = pages_service(deferred_app)
    try:
        assert not running(deferred)  # gunicorn.conf.py starts it after the fork
        assert deferred.start_worker()
        assert running(deferred)
    finally:
        deferred.close()
    with pytest.raises(LookupError):
        pages_service(Flask(__name__))


def test_main_command_line() -> None:
    assert gunicorn_argv("127.0.0.1", 8123, None) == [
        "gunicorn",
        "--config",
        str(CONFIG),
        "--bind",
        "127.0.0.1:8123",
        APP,
    ]
    assert "--workers" in gunicorn_argv("127.0.0.1", 8123, 3)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0


class RecordingLog:
    """Stands in for gunicorn's ``server.log``: keeps what the hooks log."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def warning(self, message: str, *args: object) -> None:
        self.lines.append(("warning", message % args))

    def error(self, message: str, *args: object) -> None:
        self.lines.append(("error", message % args))


def fake_arbiter(workers: int) -> Any:
    """What ``on_starting`` reads of gunicorn's arbiter: its settings and its log."""
    return SimpleNamespace(cfg=SimpleNamespace(workers=workers), log=RecordingLog())


def test_on_starting_warns_once_about_several_workers_without_multiproc_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """gunicorn's master warns once, naming PROMETHEUS_MULTIPROC_DIR, when several workers
    would each keep their own metrics; with the directory set it empties it instead."""
    hooks = runpy.run_path(str(CONFIG))
    monkeypatch.delenv("ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    server = fake_arbiter(workers=3)
    hooks["on_starting"](server)
    assert len(server.log.lines) == 1
    level, message = server.log.lines[0]
    assert level == "warning"
    assert message.startswith("3 workers without PROMETHEUS_MULTIPROC_DIR")

    (tmp_path / "histogram_7.db").write_bytes(b"an earlier run")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    server = fake_arbiter(workers=3)
    hooks["on_starting"](server)
    assert server.log.lines == []
    assert list(tmp_path.iterdir()) == []


def test_short_admin_token_stops_gunicorn_and_main_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An ADMIN_TOKEN under 16 characters: gunicorn's master logs one error and exits 2 before
    any worker starts; ``python -m examples.flask_pages`` prints one line and exits 2."""
    monkeypatch.setenv("ADMIN_TOKEN", "short")
    server = fake_arbiter(workers=1)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(CONFIG))["on_starting"](server)
    assert exit_info.value.code == 2
    assert [level for level, _ in server.log.lines] == ["error"]
    assert "ADMIN_TOKEN must be at least 16 characters" in server.log.lines[0][1]

    monkeypatch.setattr(flask_main, "run_dev_server", pytest.fail)
    with pytest.raises(SystemExit) as exit_info:
        main(["--dev"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert error.startswith("python -m examples.flask_pages: error: ADMIN_TOKEN must be")


def pages_create(http: httpx.Client, text: str) -> str:
    blocks = [{"id": "a", "type": "paragraph", "content": text}]
    response = http.post("/pages", json={"blocks": blocks})
    assert response.status_code == 201, response.text
    page_id: str = response.json()["id"]
    return page_id


# --- under gunicorn -------------------------------------------------------------------------


@dataclass
class Served:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


@pytest.fixture
def gunicorn_server(tmp_path: Path) -> Iterator[Served]:
    """One sync gunicorn worker serving ``examples.flask_pages.wsgi:app`` on a free port."""
    if sys.platform == "win32":  # pragma: no cover
        pytest.skip("gunicorn needs a POSIX system")
    pytest.importorskip("gunicorn")
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"REDIS_URL", "PROMETHEUS_MULTIPROC_DIR", "API_TOKENS", "ADMIN_TOKEN"}
    }
    env.update(
        DATABASE_URL=f"sqlite:///{tmp_path / 'pages.db'}",
        WORKER_MODE="inprocess",
        SAVE_LIMIT="100/minute",
        IP_LIMIT="1000/minute",
        PYTHONUNBUFFERED="1",
    )
    command = [sys.executable, "-m", "gunicorn", "--config", str(CONFIG)]
    command += ["--workers", "1", "--worker-class", "sync", "--bind", f"127.0.0.1:{port}"]
    command += [*gunicorn_options(), APP]  # --no-control-socket where gunicorn has one
    log = tmp_path / "gunicorn.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT
        )
    served = Served(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                pytest.fail(f"gunicorn exited with {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{served.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"gunicorn did not serve within 20 s:\n{log.read_text()}")
            time.sleep(0.05)
        yield served
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:  # pragma: no cover
                process.kill()
                process.wait(timeout=15)


def test_under_gunicorn(gunicorn_server: Served) -> None:
    """Create, patch, stale 412, and the worker thread of the gunicorn worker indexes it."""
    with httpx.Client(base_url=gunicorn_server.url, timeout=10) as http:
        assert http.get("/healthz").json()["checks"]["database"]["status"] == "ok"
        page_id = pages_create(http, "Hello")
        ops = [{"op": "replace", "path": "/0/content", "value": "Hello wombat"}]
        headers = {"Content-Type": PATCH_TYPE}
        saved = http.patch(
            f"/pages/{page_id}", content=json.dumps(ops), headers={**headers, "If-Match": '"v1"'}
        )
        assert saved.status_code == 200
        assert saved.headers["ETag"] == '"v2"'
        stale = http.patch(
            f"/pages/{page_id}", content=json.dumps(ops), headers={**headers, "If-Match": '"v1"'}
        )
        assert stale.status_code == 412

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            results = http.get("/search", params={"q": "wombat"}).json()["results"]
            if results:
                break
            time.sleep(0.05)
        assert [hit["id"] for hit in results] == [page_id]

        while True:  # the job is counted when its ack goes out, just after the commit
            samples = scrape(http)
            completed = value(samples, "hardening_jobs_total", queue="index", outcome="completed")
            if completed >= 1 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert requests_seen(samples, "PATCH", ROUTE, 200) == 1
        assert requests_seen(samples, "PATCH", ROUTE, 412) == 1
        assert requests_seen(samples, "POST", "/pages", 201) == 1
        assert completed >= 1

    process = gunicorn_server.process
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0
    log = gunicorn_server.log.read_text()
    assert "indexing worker started in process" in log
    assert "Traceback" not in log
