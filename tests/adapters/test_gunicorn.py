"""The WSGI stack on a real gunicorn over loopback: sync worker, and gthread with 2 threads.

tests/adapters/gunicorn_flask_app.py puts a Flask app inside BodyLimit(Metrics(RateLimit(
Error(flask)))) and mounts ``/metrics`` and ``/healthz`` beside it; gunicorn serves it with one
worker (the limiter counts in memory) and httpx talks to it over real HTTP. Each test names its
own client in ``X-Client``, so tests sharing a server do not share rate-limit counters.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hardening.adapters import PROBLEM_JSON
from tests.conftest import free_port, gunicorn_options

HERE = Path(__file__).resolve().parent
MAX_BYTES = 1024  # gunicorn_flask_app.MAX_BYTES
_clients = itertools.count()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="gunicorn needs a POSIX system"),
]


def _wait_until_serving(url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"gunicorn exited with {server.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    pytest.fail(f"gunicorn did not serve within 30 s:\n{log.read_text()}")


@pytest.fixture(
    scope="module",
    params=[["-k", "sync"], ["-k", "gthread", "--threads", "2"]],
    ids=["sync", "gthread"],
)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A real gunicorn (1 worker) serving gunicorn_flask_app:app; its base URL."""
    pytest.importorskip("gunicorn")
    port = free_port()
    log = tmp_path_factory.mktemp("gunicorn") / "gunicorn.log"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    command = [sys.executable, "-m", "gunicorn", "-w", "1", *request.param]
    command += ["-b", f"127.0.0.1:{port}", "--graceful-timeout", "5", *gunicorn_options()]
    command += ["--pythonpath", str(HERE), "gunicorn_flask_app:app"]
    with log.open("wb") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until_serving(url, process, log)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:  # pragma: no cover
            process.kill()
            process.wait(timeout=15)


@pytest.fixture
def http(server: str) -> Iterator[httpx.Client]:
    """An httpx client for the server, sending a client name of this test's own."""
    headers = {"X-Client": f"test-{next(_clients)}"}
    with httpx.Client(base_url=server, headers=headers, timeout=10) as client:
        yield client


def test_rate_limit_429_after_three(http: httpx.Client) -> None:
    """3/minute: three 200s counting down, then 429 problem+json with the headers."""
    allowed = [http.get("/pages/1") for _ in range(3)]
    assert [r.status_code for r in allowed] == [200, 200, 200]
    assert [r.headers["x-ratelimit-remaining"] for r in allowed] == ["2", "1", "0"]
    refused = http.get("/pages/1")
    assert refused.status_code == 429
    assert refused.headers["content-type"] == PROBLEM_JSON
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-limit"] == "3"
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert "ratelimit-policy" in refused.headers
    assert refused.json()["status"] == 429


def _route_count(url: str, route: str, status: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "http_server_request_duration_seconds_count"
        and sample.labels["http_route"] == route
        and sample.labels["http_response_status_code"] == status
    )


def test_metrics_show_the_flask_route_template(server: str, http: httpx.Client) -> None:
    """/metrics reports the requests under Flask's route template, not the raw path."""
    before = _route_count(server, "/pages/<int:page_id>", "200")
    assert http.get("/pages/41").status_code == 200
    assert http.get("/pages/42").status_code == 200
    assert _route_count(server, "/pages/<int:page_id>", "200") == before + 2
    assert _route_count(server, "/pages/41", "200") == 0


def test_metrics_content_type(server: str) -> None:
    """The scrape has its Content-Type."""
    response = httpx.get(f"{server}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")


def test_healthz(server: str) -> None:
    """/healthz answers 200 with the check results."""
    response = httpx.get(f"{server}/healthz", timeout=10)
    assert response.status_code == 200
    assert response.json()["checks"]["self"]["status"] == "ok"


def test_oversized_body_is_413(http: httpx.Client) -> None:
    """A declared body over the limit: 413 problem+json before Flask runs."""
    response = http.post("/upload", content=b"x" * (MAX_BYTES + 1))
    assert response.status_code == 413
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.json()["max_bytes"] == MAX_BYTES


def test_oversized_chunked_body_is_413(http: httpx.Client) -> None:
    """A chunked body over the limit is refused as Flask reads it (via flask_error_handler)."""
    response = http.post("/upload", content=iter([b"y" * 700, b"y" * 700]))
    assert response.status_code == 413
    assert response.json()["max_bytes"] == MAX_BYTES


def test_allowed_chunked_body_arrives_whole(http: httpx.Client) -> None:
    """A chunked body within the limit reaches Flask whole."""
    response = http.post("/upload", content=iter([b"z" * 500, b"z" * 500]))
    assert response.status_code == 200
    assert response.text == "1000"


def test_conflict_is_409_problem(http: httpx.Client) -> None:
    """A view raising ConflictError answers 409 problem+json with the versions."""
    response = http.get("/pages/9")
    assert response.status_code == 409
    assert response.headers["content-type"] == PROBLEM_JSON
    problem = response.json()
    assert (problem["expected_version"], problem["current_version"]) == (1, 2)
