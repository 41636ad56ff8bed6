"""The ``hardening`` command: operate the primitives from a shell.

- ``hardening ratelimit show|reset KEY``: where a key stands, or forget it (``--storage URL``,
  ``--limit``, ``--strategy``, ``--prefix``).
- ``hardening worker module:Processor --backend URL --concurrency N``: run a queue worker until
  SIGTERM/SIGINT (graceful: in-flight jobs finish, the rest are released).
- ``hardening queue init|stats|dead|requeue|purge|cleanup``: operate a queue (``--backend URL``,
  ``--queue NAME``).
- ``hardening history verify --database URL [--storage document|block] (DOC_ID ... | --all)``:
  check documents' stored histories (rows, checksum chain, snapshots, head); one line per
  damaged or missing document, then a summary; exit status 1 if any.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO, TypeVar

from hardening.errors import HardeningError

__all__ = ["main"]

T = TypeVar("T")


def _ratelimit_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("ratelimit", help="inspect or reset rate-limit keys")
    actions = parser.add_subparsers(dest="action", required=True)
    for action, text in (("show", "show where a key stands"), ("reset", "forget a key")):
        cmd = actions.add_parser(action, help=text)
        cmd.add_argument("key", help="the rate-limit key, e.g. user:42 or ip:203.0.113.9")
        cmd.add_argument(
            "--storage",
            default=os.environ.get("HARDENING_RATELIMIT_STORAGE", "memory://"),
            help="storage URL (default: $HARDENING_RATELIMIT_STORAGE or memory://)",
        )
        cmd.add_argument(
            "--limit",
            action="append",
            required=True,
            help="the limiter's limits, e.g. 30/minute (repeat or use ';')",
        )
        cmd.add_argument(
            "--strategy",
            default="sliding-window-counter",
            choices=["sliding-window-counter", "moving-window", "fixed-window"],
        )
        cmd.add_argument("--prefix", default="hardening", help="the limiter's key_prefix")
        cmd.add_argument("--tier", default=None, help="the key's tier (show only)")


def _ratelimit(args: argparse.Namespace, out: TextIO) -> int:
    from hardening.ratelimit import RateLimiter

    with RateLimiter(
        args.limit,
        storage=args.storage,
        strategy=args.strategy,
        key_prefix=args.prefix,
        on_backend_error="deny",
    ) as limiter:
        if args.action == "reset":
            limiter.reset(args.key)
            print(f"reset {args.key}", file=out)
            return 0
        decision = limiter.peek(args.key, tier=args.tier)
        if decision.error:
            print(f"error: the storage at {args.storage} did not answer", file=sys.stderr)
            return 1
        rows = [("key", args.key), ("storage", args.storage), ("strategy", args.strategy)]
        if decision.limit is None:
            rows.append(("limit", "unlimited tier"))
        for state in decision.states:
            rows.append(
                (
                    f"limit {state.limit}",
                    f"{state.remaining} of {state.limit.amount} left, "
                    f"window resets in {state.reset_after:.1f}s",
                )
            )
        rows.append(
            ("blocked", f"yes, for {decision.retry_after:.1f}s" if decision.blocked else "no")
        )
        rows.append(
            (
                "next hit",
                "allowed" if decision.allowed else f"denied, retry in {decision.retry_after:.1f}s",
            )
        )
        width = max(len(name) for name, _ in rows)
        for name, value in rows:
            print(f"{name:<{width}}  {value}", file=out)
        return 0


def _queue_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    backend_help = "queue backend URL: memory://, sqlite:///…, postgresql+psycopg://…, redis://…"
    default_backend = os.environ.get("HARDENING_QUEUE_BACKEND", "")
    worker = sub.add_parser("worker", help="run a queue worker until SIGTERM/SIGINT")
    worker.add_argument("processor", help="module:ClassName of a QueueProcessor subclass")
    worker.add_argument(
        "--backend", default=default_backend, required=not default_backend, help=backend_help
    )
    worker.add_argument("--concurrency", type=int, default=None)
    worker.add_argument("--queue", default=None, help="override the processor's queue name")
    worker.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve this worker's Prometheus metrics (queue depth, jobs, durations) on "
        "http://HOST:PORT/metrics",
    )
    worker.add_argument(
        "--metrics-host",
        default="0.0.0.0",  # a scraper reaches the pod's address, as with start_http_server
        help="address for --metrics-port (default %(default)s)",
    )
    queue = sub.add_parser("queue", help="inspect and operate a queue")
    actions = queue.add_subparsers(dest="action", required=True)
    texts = {
        "init": "create the SQL table and indexes (SQL backends)",
        "stats": "jobs per state and the oldest waiting job's age",
        "dead": "list dead-lettered jobs with their last error",
        "requeue": "put dead jobs back to waiting (all, or --id ...)",
        "purge": "delete dead jobs (all, or --id ...)",
        "cleanup": "delete finished jobs older than --older-than seconds",
    }
    for action, text in texts.items():
        cmd = actions.add_parser(action, help=text)
        cmd.add_argument(
            "--backend", default=default_backend, required=not default_backend, help=backend_help
        )
        cmd.add_argument("--queue", default="default")
        if action in ("requeue", "purge"):
            cmd.add_argument("--id", action="append", dest="ids", help="a job id (repeatable)")
        if action == "dead":
            cmd.add_argument("--limit", type=int, default=20)
        if action == "cleanup":
            cmd.add_argument(
                "--older-than", type=float, default=7 * 86400.0, help="seconds (default: 7 days)"
            )


def _with_progress(label: str, work: Callable[[], T], err: TextIO) -> T:
    """Run ``work`` while a progress line shows elapsed time (long operations on big queues)."""
    done = threading.Event()
    start = time.monotonic()

    def show() -> None:
        frames = "|/-\\"
        tick = 0
        while not done.wait(0.2):
            print(
                f"\r{label} {frames[tick % 4]} {time.monotonic() - start:5.1f}s",
                end="",
                file=err,
                flush=True,
            )
            tick += 1

    spinner = threading.Thread(target=show, daemon=True)
    spinner.start()
    try:
        return work()
    finally:
        done.set()
        spinner.join()
        if time.monotonic() - start >= 0.2:
            print(f"\r{label} done in {time.monotonic() - start:.1f}s", file=err)


def _worker(args: argparse.Namespace, out: TextIO) -> int:
    from hardening.queue import QueueProcessor

    module_name, _, class_name = args.processor.partition(":")
    if not class_name:
        print("error: the processor is given as module:ClassName", file=sys.stderr)
        return 2
    sys.path.insert(0, os.getcwd())
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, QueueProcessor)):
        print(f"error: {args.processor} is not a QueueProcessor subclass", file=sys.stderr)
        return 2
    options: dict[str, Any] = {}
    if args.concurrency is not None:
        options["concurrency"] = args.concurrency
    if args.queue is not None:
        options["queue"] = args.queue
    server = None
    if args.metrics_port is not None:
        from hardening.metrics import Metrics

        options["metrics"] = metrics = Metrics()
        server = _serve_metrics(metrics, args.metrics_host, args.metrics_port)
    processor = cls(args.backend, **options)
    where = ""
    if server is not None:
        host, port = server.server_address[:2]
        where = f"; metrics on http://{host}:{port}/metrics"
    print(
        f"worker {processor.worker_id}: queue {processor.queue_name!r} on "
        f"{type(processor.backend).__name__}, concurrency {processor.options.concurrency}"
        f"{where}",
        file=out,
        flush=True,
    )
    try:
        processor.run()
    finally:
        processor.close()
        if server is not None:
            server.shutdown()
            server.server_close()
    print("worker stopped", file=out)
    return 0


def _serve_metrics(metrics: Any, host: str, port: int) -> Any:
    """The WSGI ``metrics_app`` at ``/metrics`` on a daemon thread (``port`` 0: any free port).

    The same endpoint an application mounts (format negotiation, gzip, ``HEAD``, 405), served
    by the standard library's WSGI server; any other path is a 404.
    """
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from hardening.adapters.wsgi import metrics_app

    endpoint = metrics_app(metrics)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") != "/metrics":
            start_response(
                "404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "0")]
            )
            return [b""]
        return endpoint(environ, start_response)

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass  # a scrape every few seconds is not news

    server = make_server(host, port, app, server_class=Server, handler_class=Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def _queue(args: argparse.Namespace, out: TextIO) -> int:
    from hardening.queue import backend_from_url

    backend = backend_from_url(args.backend)
    try:
        queue = args.queue
        if args.action == "init":
            create = getattr(backend, "create_schema", None)
            if create is not None:
                create()
            print(f"ready: {type(backend).__name__}", file=out)
        elif args.action == "stats":
            stats = backend.stats(queue)
            for name in ("waiting", "delayed", "running", "retrying", "dead", "completed"):
                print(f"{name:<10} {getattr(stats, name):>10,}", file=out)
            print(f"{'oldest':<10} {stats.oldest_waiting_age:>9.1f}s", file=out)
        elif args.action == "dead":
            jobs = backend.dead_letters(queue, limit=args.limit)
            for job in jobs:
                error = job.last_error
                why = f"{error.type}: {error.message}" if error else "?"
                print(f"{job.id}  attempts={job.attempts}  {why[:100]}", file=out)
            print(f"{len(jobs)} dead job(s) shown", file=out)
        elif args.action == "requeue":
            count = _with_progress(
                "requeueing", lambda: backend.requeue_dead(queue, args.ids), sys.stderr
            )
            print(f"requeued {count} job(s)", file=out)
        elif args.action == "purge":
            count = _with_progress(
                "purging", lambda: backend.purge_dead(queue, args.ids), sys.stderr
            )
            print(f"purged {count} job(s)", file=out)
        else:
            count = _with_progress(
                "cleaning up",
                lambda: backend.cleanup(queue, older_than=args.older_than),
                sys.stderr,
            )
            print(f"deleted {count} finished job(s)", file=out)
    finally:
        backend.close()
    return 0


def _history_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    default_database = os.environ.get("HARDENING_HISTORY_DATABASE", "")
    history = sub.add_parser("history", help="check stored document histories")
    actions = history.add_subparsers(dest="action", required=True)
    verify = actions.add_parser(
        "verify", help="walk each document's history: rows, checksum chain, snapshots, head"
    )
    verify.add_argument("doc_ids", nargs="*", metavar="DOC_ID", help="the documents to check")
    verify.add_argument("--all", action="store_true", help="check every document")
    verify.add_argument(
        "--database",
        default=default_database,
        required=not default_database,
        help="SQLAlchemy URL of the database (default: $HARDENING_HISTORY_DATABASE)",
    )
    verify.add_argument(
        "--storage",
        choices=["document", "block"],
        default="document",
        help="DocumentHistory's tables (default) or BlockHistory's",
    )
    verify.add_argument("--id-key", default="id", help="the blocks' id member (block storage)")
    verify.add_argument(
        "--blocks-key", default="blocks", help="the member holding the blocks (block storage)"
    )


def _history(args: argparse.Namespace, out: TextIO) -> int:
    if bool(args.doc_ids) == args.all:
        print("error: name the documents to check (DOC_ID ...) or give --all", file=sys.stderr)
        return 2
    from hardening._imports import require

    require("sqlalchemy", extra="sqlalchemy", feature="hardening history verify")
    import sqlalchemy as sa

    from hardening.blocks._integrity import document_ids
    from hardening.errors import NotFoundError

    try:
        engine = sa.create_engine(args.database)
    except sa.exc.ArgumentError as exc:
        print(f"error: --database is not a database URL: {exc}", file=sys.stderr)
        return 2
    try:
        history: Any
        if args.storage == "block":
            from hardening.blocks._blockrows import heads
            from hardening.blocks.blockhistory import BlockHistory

            history = BlockHistory(engine, id_key=args.id_key, blocks_key=args.blocks_key)
        else:
            from hardening.blocks._docrows import documents as heads
            from hardening.blocks.history import DocumentHistory

            history = DocumentHistory(engine)
        names = document_ids(engine, heads) if args.all else args.doc_ids
        checked = damaged = unchained = 0
        for doc_id in names:
            checked += 1
            try:
                report = history.verify(doc_id)
            except NotFoundError:
                damaged += 1
                print(f"missing {_printable(doc_id)}: no such document", file=out)
                continue
            unchained += report.unchained
            if report.problem is not None:
                damaged += 1
                problem = report.problem
                reason = " ".join(problem.reason.split())
                print(f"corrupt {_printable(doc_id)} version {problem.version}: {reason}", file=out)
        print(
            f"checked {checked} document(s): {damaged} corrupt or missing, "
            f"{unchained} unchained row(s) (saved before the checksums)",
            file=out,
        )
        return 1 if damaged else 0
    finally:
        engine.dispose()


def _printable(text: str) -> str:
    """``text`` as it is, or quoted if it would break the one-line output."""
    return text if text.isprintable() and text.strip() == text and text else repr(text)


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run the ``hardening`` command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
        out: where to print (default: standard output).

    Returns:
        The exit status: 0 on success, 1 when a backend failed (or ``history verify`` found a
        damaged or missing document), 2 on bad usage.
    """
    parser = argparse.ArgumentParser(
        prog="hardening",
        description="Operate hardening's primitives from a shell: rate-limit keys, queue "
        "workers and queues, stored document histories.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _ratelimit_parser(sub)
    _queue_parsers(sub)
    _history_parsers(sub)
    args = parser.parse_args(argv)
    stream = out or sys.stdout
    handlers = {"ratelimit": _ratelimit, "worker": _worker, "queue": _queue, "history": _history}
    try:
        return handlers[args.command](args, stream)
    except Exception as exc:
        # one line with the fix, not a page of SQLAlchemy traceback (on Python 3.10 SQLite
        # cannot tell a missing table from an outage: look behind BackendUnavailable too)
        if _missing_table(exc) or _missing_table(exc.__cause__):
            print(
                f"error: {_MISSING_TABLE.get(args.command, _MISSING_TABLE['queue'])}",
                file=sys.stderr,
            )
            return 1
        if isinstance(exc, HardeningError):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


_MISSING_TABLE = {
    "queue": "the queue's table does not exist: run 'hardening queue init'",
    "history": "the history tables do not exist in this database (check --database, --storage)",
}


def _missing_table(exc: BaseException | None) -> bool:
    """Whether ``exc`` is the database saying a table does not exist (PostgreSQL, SQLite)."""
    if exc is None or type(exc).__module__.split(".")[0] != "sqlalchemy":
        return False
    orig = getattr(exc, "orig", None)
    if getattr(orig, "sqlstate", None) == "42P01":  # undefined_table
        return True
    return "no such table" in str(orig or "")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
