"""Load test for the pages service: simulated users editing shared pages, then verification.

Run the service with an admin token and its limits raised: every simulated user comes from this
host, so all of them share one per-IP budget (``IP_LIMIT``, 600 requests a minute by default),
and each saves about once per ``--think`` second, over the default ``SAVE_LIMIT`` of 30 a
minute; with the defaults the run measures the service's own 429s::

    export ADMIN_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')
    IP_LIMIT=1000000/minute SAVE_LIMIT=1000/minute python -m examples.pages_service --port 8000

then, with the same ``ADMIN_TOKEN``::

    python -m examples.loadtest --url http://127.0.0.1:8000 --users 50 --pages 10 \\
        --blocks 100 --duration 30 --admin-token "$ADMIN_TOKEN" --json results.json

(``examples/pages_service/README.md``, "Load test": the same on PostgreSQL, Redis and two
worker processes.)

What it does:

1. **setup** -- creates ``--pages`` pages of ``--blocks`` realistic blocks (ids, type
   paragraph/heading/list, a sentence or two of words), a few at a time, with the admin token
   (which bypasses the rate limits) when one is given.
2. **load** -- ``--users`` simulated users (``X-User: user-<n>``) are spread over
   ``--processes`` generator processes (default: one per 100 users, at most one per CPU; with
   one, the users run in the main process). Each process runs its own event loop and its own
   ``httpx`` connection pool, and is started with ``spawn``. Each user loops: think
   (exponential, mean ``--think`` seconds), pick a page (a hot page with probability
   ``--shared``, else any page), open it unless it holds a fresh local copy (stale copies are
   kept on purpose: they produce the 412s), make one small edit and save it with
   :class:`~examples.pages_service.client.PagesClient` (a patch with ``If-Match``; on 412 it
   re-fetches, rebases and retries; on 429 it waits ``Retry-After``). An edit appends a unique
   marker word (``m<run>u<user>x<seq>``) to a block, inserts a block holding a marker, or moves
   a block. Nothing is ever deleted, so every acknowledged marker must survive. Meanwhile the
   main process scrapes ``/metrics`` every second for the index queue's depth and shows a
   progress line on stderr, and each generator process measures its own CPU use and event-loop
   lag: when one used more than half a core or its loop lag p99 passed 20 ms, the report warns
   that the generator may have inflated the latencies.
3. **verification** -- in the main process, over every process's acknowledged saves: (1) every
   page holds every marker acknowledged for it, its original blocks and acknowledged inserts,
   and its version is ``1 +`` the saves acknowledged for it (the acknowledged versions are
   distinct: each ack is exactly one version bump); (2) search catches up:
   ``/search?q=<newest marker>`` finds every page within ``--search-timeout``.

Prints a table on stdout (``--json FILE`` writes every number); exits 1 when verification
fails, 2 when setup fails or a generator process crashed.

Modules: :mod:`.options` (the command line), :mod:`.users` (page contents, edits, the simulated
user), :mod:`.recording` (what a generator process measures), :mod:`.share` (one process's
share of the users), :mod:`.procs` (the run: processes, merging, verification; the CLI),
:mod:`.verify` (setup and the checks), :mod:`.metrics` (``/metrics`` parsing, loop lag),
:mod:`.report` (results, the warning rule, the table), :mod:`.stats` (percentiles).
"""

from __future__ import annotations

from examples.loadtest.metrics import (
    QueueSample,
    histogram_quantile,
    measure_lag,
    queue_depth,
    request_histograms,
    server_latency,
)
from examples.loadtest.options import Options, parse_args, split_users
from examples.loadtest.procs import GeneratorFailed, amain, main, merge, run
from examples.loadtest.recording import Ack, Recorder, TimingTransport, request_kind
from examples.loadtest.report import (
    GeneratorStats,
    Results,
    generator_warnings,
    report,
    sparkline,
    warning_line,
)
from examples.loadtest.share import Share, ShareResult, load_share
from examples.loadtest.stats import percentile
from examples.loadtest.users import Abandoned, LoadClient, Run, make_block, make_edit, make_page
from examples.loadtest.verify import Verification, create_pages, verify_saves, wait_for_search

__all__ = [
    "Abandoned",
    "Ack",
    "GeneratorFailed",
    "GeneratorStats",
    "LoadClient",
    "Options",
    "QueueSample",
    "Recorder",
    "Results",
    "Run",
    "Share",
    "ShareResult",
    "TimingTransport",
    "Verification",
    "amain",
    "create_pages",
    "generator_warnings",
    "histogram_quantile",
    "load_share",
    "main",
    "make_block",
    "make_edit",
    "make_page",
    "measure_lag",
    "merge",
    "parse_args",
    "percentile",
    "queue_depth",
    "report",
    "request_histograms",
    "request_kind",
    "run",
    "server_latency",
    "sparkline",
    "split_users",
    "verify_saves",
    "wait_for_search",
    "warning_line",
]
