"""``python -m examples.flask_pages``: serve the pages service on Flask, on localhost.

With gunicorn (``gunicorn.conf.py`` in this directory) by default, or werkzeug's development
server with ``--dev`` (also used where gunicorn is unavailable, e.g. on Windows). Embedded
defaults: a SQLite file ``pages.db`` in the current directory, an in-memory rate limiter and
the indexing worker inside the web process. Configure with the environment (``DATABASE_URL``,
``REDIS_URL``, ``ADMIN_TOKEN``, ``WORKER_MODE``, ...; see ``examples/flask_pages/README.md``).
An unusable setting (an ``ADMIN_TOKEN`` under 16 characters, say) is one line on stderr and exit
status 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from examples.pages_service.store import Settings, SettingsError

CONFIG = Path(__file__).with_name("gunicorn.conf.py")
APP = "examples.flask_pages.wsgi:app"
logger = logging.getLogger("pages_service")


def gunicorn_argv(host: str, port: int, workers: int | None) -> list[str]:
    """The gunicorn command line that serves the app."""
    argv = ["gunicorn", "--config", str(CONFIG), "--bind", f"{host}:{port}"]
    if workers is not None:
        argv += ["--workers", str(workers)]
    return [*argv, APP]


def run_dev_server(host: str, port: int) -> None:
    """Serve with werkzeug's threaded development server (one process)."""
    from werkzeug.serving import run_simple

    from examples.flask_pages.app import create_app, pages_service

    app = create_app()
    try:
        run_simple(host, port, app, threaded=True, use_reloader=False)
    finally:
        pages_service(app).close()


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(prog="python -m examples.flask_pages")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument(
        "--workers", type=int, default=None, help="gunicorn worker processes (WEB_CONCURRENCY)"
    )
    parser.add_argument(
        "--dev", action="store_true", help="werkzeug's development server instead of gunicorn"
    )
    args = parser.parse_args(argv)
    try:
        Settings.from_env()  # each worker reads them again; refuse here, before any starts
    except SettingsError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not args.dev and importlib.util.find_spec("gunicorn") is None:
        logger.warning("gunicorn is not installed: serving with werkzeug's development server")
        args.dev = True
    if args.dev:
        run_dev_server(args.host, args.port)
        return
    # gunicorn.conf.py's on_starting checks the settings and warns about several workers
    sys.argv = gunicorn_argv(args.host, args.port, args.workers)
    importlib.import_module("gunicorn.app.wsgiapp").run()  # the `gunicorn` command


if __name__ == "__main__":
    main()
