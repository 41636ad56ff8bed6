"""``python -m examples.pages_service``: serve the pages service with uvicorn on localhost.

Embedded defaults: a SQLite file ``pages.db`` in the current directory, an in-memory rate
limiter, and the indexing worker inside the web process. Configure with the environment
(``DATABASE_URL``, ``REDIS_URL``, ``ADMIN_TOKEN``, ``WORKER_MODE``, ...; see
``examples/pages_service/README.md``).

The settings are checked before uvicorn starts: an unusable one (an ``ADMIN_TOKEN`` under 16
characters, say) is one line on stderr and exit status 2. With ``--workers`` above 1, a missing
``REDIS_URL`` or ``PROMETHEUS_MULTIPROC_DIR`` is warned about once; a set
``PROMETHEUS_MULTIPROC_DIR`` is emptied (and created) before the workers start, so an earlier
run's counters are not added in.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

import uvicorn

from examples.pages_service.store import Settings, SettingsError, process_warnings
from hardening import wipe_multiprocess_dir

logger = logging.getLogger("pages_service")


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, check the settings and run uvicorn."""
    parser = argparse.ArgumentParser(prog="python -m examples.pages_service")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    args = parser.parse_args(argv)
    try:
        Settings.from_env()  # each worker reads them again; refuse here, before any starts
    except SettingsError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for warning in process_warnings(args.workers, os.environ):
        logger.warning(warning)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        wipe_multiprocess_dir()
    uvicorn.run(
        "examples.pages_service.app:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="info",
        access_log=False,
    )


if __name__ == "__main__":
    main()
