"""The ASGI stack on a real server: uvicorn in a subprocess, spoken to over loopback HTTP.

The app is ``tests/adapters/uvicorn_app.py``. One server per HTTP implementation (h11, and
httptools when installed) serves every test in this module; it is always stopped, and must
shut down cleanly (lifespan shutdown completed, no traceback, exit on the signal sent).
"""

from __future__ import annotations

import importlib.util
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

from tests.adapters.uvicorn_app import LIMITED, MAX_BYTES
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
PROBLEM_JSON = "application/problem+json"


class UvicornServer:
    """``python -m uvicorn tests.adapters.uvicorn_app:app`` (or ``app``) on a loopback port."""

    def __init__(
        self,
        http: str,
        log: Path,
        *,
        app: str = "tests.adapters.uvicorn_app:app",
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"} | (env or {})
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                app,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--lifespan",
                "on",
                "--http",
                http,
                "--no-access-log",
                "--log-level",
                "info",
            ],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        """What the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until ``/healthz`` answers; fail with the server's log if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"uvicorn exited ({self.process.returncode}):\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"uvicorn did not answer within {timeout}s:\n{self.log()}")

    def stop(self) -> int:
        """SIGTERM (a graceful shutdown), SIGKILL if it hangs; return the exit status."""
        try:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    return self.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=15)
                    return -9
            return self.process.returncode
        finally:
            self._log.close()


@pytest.fixture(
    scope="module",
    params=[
        "h11",
        pytest.param(
            "httptools",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("httptools") is None, reason="httptools is not installed"
            ),
        ),
    ],
)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[UvicornServer]:
    """A running uvicorn; stopped afterwards, and it must have shut down cleanly."""
    log = tmp_path_factory.mktemp("uvicorn") / f"{request.param}.log"
    running = UvicornServer(request.param, log)
    try:
        running.wait_ready()
        yield running
    finally:
        status = running.stop()
    output = running.log()
    # uvicorn re-raises the signal once it has shut down gracefully: -SIGTERM is a clean exit
    assert status in (0, -signal.SIGTERM), output
    assert "Application startup complete" in output, output
    assert "Application shutdown complete" in output, output
    assert "Traceback" not in output, output


@pytest.fixture
def http(server: UvicornServer) -> Iterator[httpx.Client]:
    """An HTTP client for the server."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


def requests_seen(http: httpx.Client, route: str, status: str = "200") -> float:
    """The server's count of requests for ``route`` and ``status``, from ``/metrics``."""
    text = http.get("/metrics").text
    for family in text_string_to_metric_families(text):
        if family.name != "http_server_request_duration_seconds":
            continue
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name.endswith("_count")
                and labels["http_route"] == route
                and labels["http_response_status_code"] == status
            ):
                return float(sample.value)
    return 0.0


def test_rate_limit_over_http(http: httpx.Client) -> None:
    """Over real HTTP, the rule's limit answers 429 with problem+json and the rate headers."""
    allowed = [http.get("/limited") for _ in range(LIMITED)]
    assert [r.status_code for r in allowed] == [200] * LIMITED
    assert [r.headers["x-ratelimit-remaining"] for r in allowed] == [
        str(n) for n in reversed(range(LIMITED))
    ]
    assert all(r.headers["x-ratelimit-limit"] == str(LIMITED) for r in allowed)
    denied = http.get("/limited")
    assert denied.status_code == 429
    assert denied.headers["content-type"] == PROBLEM_JSON
    assert int(denied.headers["retry-after"]) >= 1
    assert "ratelimit" in denied.headers
    assert "ratelimit-policy" in denied.headers
    assert denied.json()["status"] == 429
    assert http.get("/pages/1").status_code == 200  # another path: only the main limit


def test_metrics_by_route_template(http: httpx.Client) -> None:
    """``/metrics`` counts requests by route template, not by path."""
    before = requests_seen(http, "/pages/{page_id}")
    for page in ("a", "b", "c"):
        assert http.get(f"/pages/{page}").json() == {"page": page}
    assert requests_seen(http, "/pages/{page_id}") == before + 3
    text = http.get("/metrics").text
    assert "/pages/a" not in text
    assert 'http_route="/metrics"' not in text  # excluded


def test_metrics_formats_over_http(http: httpx.Client) -> None:
    """The scrape endpoint negotiates OpenMetrics and gzip over the wire."""
    response = http.get(
        "/metrics",
        headers={"accept": "application/openmetrics-text", "accept-encoding": "gzip"},
    )
    assert response.status_code == 200
    assert response.headers["content-encoding"] == "gzip"
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


def test_healthz(http: httpx.Client) -> None:
    """``/healthz`` answers 200 with its checks."""
    response = http.get("/healthz")
    assert response.status_code == 200
    assert response.json()["checks"]["app"]["status"] == "ok"
    assert response.headers["cache-control"] == "no-store"


def test_oversized_body_413(http: httpx.Client) -> None:
    """A declared body over the limit is 413; one at the limit is read whole."""
    response = http.post("/upload", content=b"x" * (MAX_BYTES + 1))
    assert response.status_code == 413
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.json()["max_bytes"] == MAX_BYTES
    assert http.post("/upload", content=b"x" * MAX_BYTES).json() == {"size": MAX_BYTES}


def test_oversized_chunked_body_413(http: httpx.Client) -> None:
    """A chunked body (no Content-Length) over the limit is 413 once read past it."""

    def chunks() -> Iterator[bytes]:
        for _ in range(8):
            yield b"y" * 200

    response = http.post("/upload", content=chunks())
    assert response.status_code == 413
    assert response.json()["status"] == 413


def test_conflict_problem_json(http: httpx.Client) -> None:
    """A ConflictError in a route is a 409 problem+json over the wire."""
    response = http.get("/conflict")
    assert response.status_code == 409
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.json()["current_version"] == 2


def test_absurd_content_length_refused(server: UvicornServer) -> None:
    """A 30-digit Content-Length on a raw socket is refused (by the server or the stack)."""
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: "
            + b"1" * 30
            + b"\r\nConnection: close\r\n\r\n"
        )
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status_line = reply.split(b"\r\n", 1)[0]
    assert status_line.split()[1] in (b"400", b"413"), reply
