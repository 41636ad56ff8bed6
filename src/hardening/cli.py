"""The ``hardening`` command: operate the primitives from a shell.

``hardening ratelimit show KEY`` prints where a key stands; ``hardening ratelimit reset KEY``
forgets it. Both take ``--storage URL`` (default ``$HARDENING_RATELIMIT_STORAGE`` or
``memory://``), ``--limit`` (repeatable, ``limits`` notation), ``--strategy`` and ``--prefix``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from hardening.errors import HardeningError

__all__ = ["main"]


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


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run the ``hardening`` command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
        out: where to print (default: standard output).

    Returns:
        The exit status: 0 on success, 1 when a backend failed, 2 on bad usage.
    """
    parser = argparse.ArgumentParser(prog="hardening", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _ratelimit_parser(sub)
    args = parser.parse_args(argv)
    stream = out or sys.stdout
    try:
        return _ratelimit(args, stream)
    except HardeningError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
