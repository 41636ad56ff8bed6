"""``python -m examples.pages_service``: serve the pages service with uvicorn on localhost.

Embedded defaults: a SQLite file ``pages.db`` in the current directory, an in-memory rate
limiter, and the indexing worker inside the web process. Configure with the environment
(``DATABASE_URL``, ``REDIS_URL``, ``ADMIN_TOKEN``, ``WORKER_MODE``, ...; see
``examples/pages_service/README.md``).
"""

from __future__ import annotations

import argparse
import logging
import os

import uvicorn


def main() -> None:
    """Parse the command line and run uvicorn."""
    parser = argparse.ArgumentParser(prog="python -m examples.pages_service")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    args = parser.parse_args()
    if args.workers > 1 and not os.environ.get("REDIS_URL"):
        logging.getLogger("pages_service").warning(
            "%d workers with an in-memory rate limiter: each process counts alone; "
            "set REDIS_URL to share the limits",
            args.workers,
        )
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
