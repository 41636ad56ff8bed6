"""A tiny WSGI app that tests/test_metrics.py serves with two real gunicorn workers.

``/metrics`` renders through :class:`hardening.Metrics` (multiprocess mode, from
``PROMETHEUS_MULTIPROC_DIR``); every other path counts one hit and answers with the worker's pid.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

from hardening import Metrics

StartResponse = Callable[[str, list[tuple[str, str]]], object]

metrics = Metrics()
hits = metrics.counter("test_app_hits_total", "Requests served by the test app.")


def app(environ: dict[str, object], start_response: StartResponse) -> Iterable[bytes]:
    """Count a hit (or render the metrics of every worker on ``/metrics``)."""
    if environ["PATH_INFO"] == "/metrics":
        accept = environ.get("HTTP_ACCEPT")
        body, headers = metrics.render_response(accept if isinstance(accept, str) else None)
        start_response("200 OK", list(headers.items()))
        return [body]
    request = metrics.track_http_request(str(environ["REQUEST_METHOD"]))
    time.sleep(0.005)  # a little work, so that concurrent requests spread over both workers
    hits.inc()
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    request.finish(200, "/hit")
    return [body]
