"""gunicorn settings for the pages service on Flask.

    gunicorn -c examples/flask_pages/gunicorn.conf.py examples.flask_pages.wsgi:app

Environment: ``GUNICORN_BIND`` (default ``127.0.0.1:8000``), ``WEB_CONCURRENCY`` (worker
processes, default 1: set ``REDIS_URL`` before raising it, so the processes share the rate
limits), ``GUNICORN_THREADS`` (threads per worker, default 1; above 1 gunicorn uses gthread),
``PROMETHEUS_MULTIPROC_DIR`` (set it, to an empty directory of its own, with several workers:
``/metrics`` then adds up every worker's metrics). Command-line options override these.

The indexing worker (``WORKER_MODE=inprocess``) is a thread of **each worker process**, started
after the fork: ``wsgi.py`` does not start it when it is imported under gunicorn (with
``--preload`` that import happens in the master, and a thread does not survive a fork), and
``post_worker_init`` below starts it once the worker has loaded the app. (``post_fork`` runs
earlier, before a worker without ``--preload`` has loaded the app, so it has nothing to start
yet.) ``worker_exit`` stops it, letting its in-flight jobs finish.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from examples.pages_service.store import Settings, SettingsError, process_warnings
from hardening import gunicorn_child_exit, wipe_multiprocess_dir

wsgi_app = "examples.flask_pages.wsgi:app"
bind = [os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")]
workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
threads = int(os.environ.get("GUNICORN_THREADS", "1"))
timeout = 30
graceful_timeout = 45  # the indexing thread gets its shutdown grace inside worker_exit
accesslog = None

# multiprocess metrics: drop a dead worker's live gauges (does nothing without the directory)
child_exit = gunicorn_child_exit


def _service(worker: Any) -> Any:
    """The worker's ``PagesService``, or ``None`` when its app did not load."""
    extensions = getattr(getattr(worker, "wsgi", None), "extensions", None)
    return extensions.get("pages") if isinstance(extensions, dict) else None


def on_starting(server: Any) -> None:
    """In the master, before any worker: check the settings (an unusable one is one line and
    exit status 2), warn once about what several workers need, and empty the multiprocess
    directory of a previous run."""
    try:
        Settings.from_env()
    except SettingsError as exc:
        server.log.error("error: %s", exc)
        sys.exit(2)
    for warning in process_warnings(server.cfg.workers, os.environ):
        server.log.warning(warning)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        wipe_multiprocess_dir()


def post_worker_init(worker: Any) -> None:
    """In each worker, once it has loaded the app: start its indexing thread."""
    service = _service(worker)
    if service is not None:
        service.start_worker()


def worker_exit(server: Any, worker: Any) -> None:
    """In each worker, as it exits: stop the indexing thread and close the service."""
    service = _service(worker)
    if service is not None:
        service.close()
