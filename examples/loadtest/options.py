"""The load test's options: the :class:`Options` dataclass and the command line that fills it."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Sequence

USERS_PER_PROCESS = 100  # the default spreads the users so no generator process carries more


@dataclasses.dataclass
class Options:
    """How to load the service (the command line's options).

    Attributes:
        url: the service's base URL.
        users: simulated users, each one task with its own ``X-User``.
        pages: pages created at setup.
        blocks: blocks per page at setup.
        duration: seconds of load (``None``: run ``edits_per_user`` edits instead).
        edits_per_user: edits each user attempts (``None``: run for ``duration``).
        think: mean think time between a user's edits, seconds (exponential).
        shared: fraction of edits aimed at the hot pages.
        hot_pages: how many pages are hot (default: a tenth of the pages, at least one).
        admin_token: bypasses the rate limits; used for setup and verification only.
        seed: seeds every random choice (page contents, picks, edits, think times).
        json_path: where to write the results as JSON.
        search_timeout: seconds to wait for search to find every page's newest marker.
        open_pages: local copies a user keeps (least recently used dropped first).
        copy_ttl: seconds a local copy counts as fresh; older ones are re-opened.
        max_wait: the longest ``Retry-After`` a user honours (``PagesClient.max_wait``).
        grace: seconds after the deadline that in-flight saves may still take; a 429 wait
            ending later is abandoned (nothing is in flight then, so nothing is ambiguous).
        timeout: HTTP timeout, seconds.
        setup_concurrency: pages created at once.
        connections: the connection pools' total size, split evenly over the generator
            processes (default: one per user, plus a few per process). httpcore scans every
            connection of a pool on each request, so a huge pool costs the generator CPU.
        progress: show progress on stderr.
        scrape_interval: seconds between ``/metrics`` scrapes.
        processes: generator processes the users are spread over (``None``: see
            :attr:`generator_processes`); with one, the users run in the main process.
        stay: the mean number of edits a user makes on one page before moving to another
            (geometric; 1: a new random page for every edit). An editor works on a page for a
            while; each move costs an open (the whole page) unless a fresh copy is held.
        settle: the longest wait, seconds, after setup for the index queue to empty before the
            load starts (0: start at once, while the new pages are still being indexed).
    """

    url: str = "http://127.0.0.1:8000"
    users: int = 50
    pages: int = 10
    blocks: int = 100
    duration: float | None = 30.0
    edits_per_user: int | None = None
    think: float = 1.0
    shared: float = 0.2
    hot_pages: int | None = None
    admin_token: str | None = None
    seed: int | None = None
    json_path: str | None = None
    search_timeout: float = 60.0
    open_pages: int = 4
    copy_ttl: float = 30.0
    max_wait: float = 60.0
    grace: float = 10.0
    timeout: float = 60.0
    setup_concurrency: int = 8
    connections: int | None = None
    progress: bool = True
    scrape_interval: float = 1.0
    processes: int | None = None
    stay: float = 10.0
    settle: float = 300.0

    @property
    def hot(self) -> int:
        """The number of hot pages."""
        wanted = self.hot_pages if self.hot_pages is not None else self.pages // 10
        return max(1, min(self.pages, wanted))

    @property
    def generator_processes(self) -> int:
        """The generator processes to run: ``processes``, never more than the users.

        By default enough that each carries at most ``USERS_PER_PROCESS`` users, capped at the
        machine's CPUs (so 1 for small runs).
        """
        if self.processes is not None:
            wanted = self.processes
        else:
            wanted = min(math.ceil(self.users / USERS_PER_PROCESS), os.cpu_count() or 1)
        return max(1, min(wanted, self.users))


def split_users(users: int, processes: int) -> list[range]:
    """User numbers ``0..users-1`` in ``processes`` contiguous, disjoint ranges.

    Their sizes differ by at most one (the first ranges take the remainder).
    """
    base, extra = divmod(users, processes)
    ranges, start = [], 0
    for index in range(processes):
        size = base + (1 if index < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """The options from the command line."""
    defaults = Options()
    parser = argparse.ArgumentParser(
        prog="python -m examples.loadtest",
        description="Load the pages service with simulated editors, then verify no save was "
        "lost and search caught up.",
    )
    add = parser.add_argument
    add("--url", default=defaults.url, help="service base URL (default %(default)s)")
    add("--users", type=int, default=defaults.users, help="simulated users (%(default)s)")
    add("--pages", type=int, default=defaults.pages, help="pages to create (%(default)s)")
    add("--blocks", type=int, default=defaults.blocks, help="blocks per page (%(default)s)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--duration", type=float, help="seconds of load (default 30)")
    length.add_argument("--edits-per-user", type=int, help="edits per user instead of a duration")
    add("--think", type=float, default=defaults.think, help="mean think time, s (%(default)s)")
    add("--shared", type=float, default=defaults.shared, help="share of edits on hot pages")
    add("--hot-pages", type=int, help="hot pages (default: a tenth of the pages, at least 1)")
    add("--admin-token", help="admin token (setup and verification bypass the rate limits)")
    add("--seed", type=int, help="random seed")
    add("--json", dest="json_path", metavar="FILE", help="write the results as JSON")
    add("--search-timeout", type=float, default=defaults.search_timeout, help="seconds (60)")
    add("--open-pages", type=int, default=defaults.open_pages, help="local copies per user (4)")
    add("--copy-ttl", type=float, default=defaults.copy_ttl, help="s a copy is fresh (30)")
    add("--max-wait", type=float, default=defaults.max_wait, help="longest Retry-After, s (60)")
    add("--grace", type=float, default=defaults.grace, help="s after the deadline (10)")
    add("--timeout", type=float, default=defaults.timeout, help="HTTP timeout, s (60)")
    add(
        "--stay",
        type=float,
        default=defaults.stay,
        help="mean edits a user makes on one page before moving on (%(default)s; 1: a new "
        "page every edit)",
    )
    add(
        "--settle",
        type=float,
        default=defaults.settle,
        help="longest wait, s, for the new pages' indexing to finish before the load "
        "(%(default)s; 0: no wait)",
    )
    add(
        "--connections",
        type=int,
        help="connection pool size, split over the processes (default: each one's users + 8)",
    )
    add(
        "--processes",
        type=int,
        help=f"generator processes (default: one per {USERS_PER_PROCESS} users, at most the "
        "CPUs; 1 runs the users in this process)",
    )
    add("--no-progress", dest="progress", action="store_false", help="no progress on stderr")
    args = parser.parse_args(argv)
    if args.users < 1 or args.pages < 1 or args.blocks < 1:
        parser.error("--users, --pages and --blocks must be at least 1")
    if not 0.0 <= args.shared <= 1.0:
        parser.error("--shared is a fraction between 0 and 1")
    if args.stay < 1:
        parser.error("--stay must be at least 1")
    if args.processes is not None and args.processes < 1:
        parser.error("--processes must be at least 1")
    options = Options(**{k: v for k, v in vars(args).items() if k in _FIELDS and v is not None})
    if args.edits_per_user is not None:
        options.duration = None
    return options


_FIELDS = {f.name for f in dataclasses.fields(Options)}
