"""Load test for the pages service: simulated users editing shared pages, then verification.

Run the service (``python -m examples.pages_service --port 8000``), then::

    python -m examples.loadtest --url http://127.0.0.1:8000 --users 50 --pages 10 \\
        --blocks 100 --duration 30 --admin-token "$ADMIN_TOKEN" --json results.json

What it does:

1. **setup** -- creates ``--pages`` pages of ``--blocks`` realistic blocks (ids, type
   paragraph/heading/list, a sentence or two of words), a few at a time, with the admin token
   (which bypasses the rate limits) when one is given.
2. **load** -- ``--users`` simulated users (``X-User: user-<n>``) share one ``httpx``
   connection pool. Each loops: think (exponential, mean ``--think`` seconds), pick a page (a
   hot page with probability ``--shared``, else any page), open it unless it holds a fresh
   local copy (stale copies are kept on purpose: they produce the 412s), make one small edit
   and save it with :class:`~examples.pages_service.client.PagesClient` (a patch with
   ``If-Match``; on 412 it re-fetches, rebases and retries; on 429 it waits ``Retry-After``).
   An edit appends a unique marker word (``m<run>u<user>x<seq>``) to a block, inserts a block
   holding a marker, or moves a block. Nothing is ever deleted, so every acknowledged marker
   must survive. Meanwhile ``/metrics`` is scraped every second for the index queue's depth,
   and a progress line goes to stderr.
3. **verification** -- (1) every page holds every marker acknowledged for it, its original
   blocks and acknowledged inserts, and its version is ``1 +`` the saves acknowledged for it
   (the acknowledged versions are distinct: each ack is exactly one version bump); (2) search
   catches up: ``/search?q=<newest marker>`` finds every page within ``--search-timeout``.

Prints a table on stdout (``--json FILE`` writes every number); exits 1 when verification
fails, 2 when setup fails.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import math
import random
import re
import secrets
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any, TextIO

import httpx
from prometheus_client.parser import text_string_to_metric_families

from examples.pages_service.client import Blocks, LocalPage, PagesClient, SaveFailed
from hardening import PatchConflict

_VOCABULARY = (
    "the of and to in is that for it as with was on be by this are from at or an have not "
    "they which one you had all we can her has there been if more when will would who so no "
    "plan release draft review team budget quarter launch design feedback customer metric "
    "report meeting notes action item owner deadline scope risk goal roadmap sprint backlog "
    "ticket deploy service latency cache index search page block editor version history save "
    "patch conflict merge queue worker limit request response server client database table "
    "schema migration test coverage bug fix feature flag rollout monitor alert dashboard "
    "budget hiring onboarding document summary decision question answer follow up next week"
)
WORDS = tuple(_VOCABULARY.split())
BLOCK_TYPES = ("paragraph", "heading", "list")
SAVE_METHODS = frozenset({"POST", "PATCH", "PUT"})
QUEUE_STATES = ("waiting", "running", "retrying")
MAX_CONTENT = 19_000  # the service takes up to 20,000 characters per block
_TOKEN = re.compile(r"\w+", re.UNICODE)


class Abandoned(Exception):
    """A save gave up waiting out a 429: the wait would end past the run's deadline."""


# --- options ----------------------------------------------------------------------------------


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
        connections: the pool's size (default: one per user, plus a few). httpcore scans every
            connection of the pool on each request, so a huge pool costs the generator CPU.
        progress: show progress on stderr.
        scrape_interval: seconds between ``/metrics`` scrapes.
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

    @property
    def hot(self) -> int:
        """The number of hot pages."""
        wanted = self.hot_pages if self.hot_pages is not None else self.pages // 10
        return max(1, min(self.pages, wanted))


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
    add("--connections", type=int, help="connection pool size (default: users + 8)")
    add("--no-progress", dest="progress", action="store_false", help="no progress on stderr")
    args = parser.parse_args(argv)
    if args.users < 1 or args.pages < 1 or args.blocks < 1:
        parser.error("--users, --pages and --blocks must be at least 1")
    if not 0.0 <= args.shared <= 1.0:
        parser.error("--shared is a fraction between 0 and 1")
    options = Options(**{k: v for k, v in vars(args).items() if k in _FIELDS and v is not None})
    if args.edits_per_user is not None:
        options.duration = None
    return options


_FIELDS = {f.name for f in dataclasses.fields(Options)}


# --- recording --------------------------------------------------------------------------------


@dataclasses.dataclass
class Ack:
    """One acknowledged save."""

    page_id: str
    version: int
    marker: str | None
    kind: str
    at: float
    user: int


def request_kind(request: httpx.Request) -> str:
    """``PATCH page``, ``GET page``, ``POST pages``, ``GET search``... for the tables."""
    path = request.url.path
    if path.startswith("/pages/"):
        return f"{request.method} page"
    if path == "/pages":
        return f"{request.method} pages"
    return f"{request.method} {path.strip('/') or '/'}"


class Recorder:
    """Everything the load phase measures; fed by the transport and the users."""

    def __init__(self, max_wait: float) -> None:
        self.started = time.monotonic()
        self.max_wait = max_wait
        self.latencies: dict[str, list[float]] = collections.defaultdict(list)
        self.statuses: dict[str, Counter[int]] = collections.defaultdict(Counter)
        self.errors: Counter[str] = Counter()
        self.requests = 0
        self.save_latencies: list[float] = []  # acknowledged saves, as the user waited
        self.save_latencies_no_429: list[float] = []  # ... that never waited on a 429
        self.open_latencies: list[float] = []
        self.acks: list[Ack] = []
        self.outcomes: Counter[str] = Counter()
        self.edit_kinds: Counter[str] = Counter()
        self.ambiguous: Counter[str] = Counter()  # page id -> saves of unknown outcome
        self.honoured_429 = 0
        self.early_429 = 0
        self.scrape_failures = 0
        self._after_429: dict[str, tuple[float, float]] = {}

    def now(self) -> float:
        """Seconds since the load started."""
        return time.monotonic() - self.started

    def request_sent(self, user: str | None, save: bool) -> None:
        """A request is about to go out; if a save, check it waited out the user's last 429."""
        self.requests += 1
        if not save or user is None or user not in self._after_429:
            return
        at, wait = self._after_429.pop(user)
        if time.monotonic() - at >= wait - 0.01:
            self.honoured_429 += 1
        else:
            self.early_429 += 1

    def response(
        self, kind: str, user: str | None, response: httpx.Response, seconds: float
    ) -> None:
        """``user``'s request got ``response`` (body read) after ``seconds``."""
        self.latencies[kind].append(seconds)
        self.statuses[kind][response.status_code] += 1
        if response.status_code == 429 and user is not None:
            try:
                wait = float(response.headers.get("retry-after", "1"))
            except ValueError:
                wait = 1.0
            self._after_429[user] = (time.monotonic(), min(max(wait, 0.0), self.max_wait))

    def error(self, kind: str, exc: BaseException) -> None:
        """A request failed without a response."""
        self.errors[f"{kind}: {type(exc).__name__}"] += 1

    def status_total(self) -> Counter[int]:
        """Responses by status, all kinds together."""
        total: Counter[int] = Counter()
        for counts in self.statuses.values():
            total.update(counts)
        return total


class TimingTransport(httpx.AsyncBaseTransport):
    """Wraps the pool's transport: times every request to its last body byte, counts statuses."""

    def __init__(self, inner: httpx.AsyncBaseTransport, recorder: Recorder) -> None:
        self.inner = inner
        self.recorder = recorder

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the inner transport and read the whole response."""
        kind, user = request_kind(request), request.headers.get("x-user")
        self.recorder.request_sent(user, request.method in SAVE_METHODS)
        start = time.perf_counter()
        response: httpx.Response | None = None
        try:
            response = await self.inner.handle_async_request(request)
            await response.aread()
        except Exception as exc:
            self.recorder.error(kind, exc)
            if response is not None:
                await response.aclose()
            raise
        self.recorder.response(kind, user, response, time.perf_counter() - start)
        return response

    async def aclose(self) -> None:
        """Close the inner transport (the connection pool)."""
        await self.inner.aclose()


# --- page contents and edits ------------------------------------------------------------------


def sentence(rng: random.Random, low: int, high: int) -> str:
    """Between ``low`` and ``high`` words, capitalised, with a full stop."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(low, high))]
    return " ".join(words).capitalize() + "."


def make_block(rng: random.Random, block_id: str | None = None) -> dict[str, Any]:
    """A realistic block: a heading (a few words), a list item, or a paragraph (1-2 sentences)."""
    kind = rng.choices(BLOCK_TYPES, weights=(7, 1, 2))[0]
    if kind == "heading":
        content = sentence(rng, 2, 6).rstrip(".")
    elif kind == "list":
        content = sentence(rng, 3, 10)
    else:
        content = " ".join(sentence(rng, 6, 18) for _ in range(rng.randint(1, 2)))
    return {"id": block_id or f"{rng.getrandbits(48):012x}", "type": kind, "content": content}


def make_page(rng: random.Random, blocks: int) -> Blocks:
    """A page of ``blocks`` blocks with distinct ids."""
    return [make_block(rng, f"{rng.getrandbits(40):010x}{i:05d}") for i in range(blocks)]


def make_edit(rng: random.Random, blocks: Blocks, marker: str) -> tuple[str, Blocks, str | None]:
    """One small edit of ``blocks``: ``(kind, edited blocks, marker or None)``.

    ``append`` adds the marker to a block's text, ``insert`` adds a block holding it, ``move``
    moves a block (no marker). Blocks are never removed, nor text; ``blocks`` is not changed.
    """
    roll = rng.random()
    if roll < 0.15 and len(blocks) >= 2:
        edited = list(blocks)
        moved = edited.pop(rng.randrange(len(edited)))
        edited.insert(rng.randrange(len(edited) + 1), moved)
        if edited != blocks:
            return "move", edited, None
    index = rng.randrange(len(blocks)) if blocks else 0
    if roll < 0.40 or not blocks or len(blocks[index]["content"]) > MAX_CONTENT:
        new = make_block(rng, marker.replace("m", "b", 1))
        new["content"] = f"{new['content']} {marker}"
        return "insert", [*blocks[:index], new, *blocks[index:]], marker
    block = blocks[index]
    changed = {**block, "content": f"{block['content']} {marker}"}
    return "append", [*blocks[:index], changed, *blocks[index + 1 :]], marker


# --- the simulated users ----------------------------------------------------------------------


class LoadClient(PagesClient):
    """A :class:`PagesClient` whose 429 waits give up when they would end past ``wait_until``."""

    def __init__(self, http: httpx.AsyncClient, *, wait_until: float | None, **kw: Any) -> None:
        super().__init__(http, **kw)
        self.wait_until = wait_until

    def _retry_after(self, response: httpx.Response) -> float:
        wait = super()._retry_after(response)
        if self.wait_until is not None and time.monotonic() + wait > self.wait_until:
            raise Abandoned(f"Retry-After {wait:.1f} s ends past the run")
        return wait


class Run:
    """The shared state of one load phase."""

    def __init__(self, options: Options, page_ids: list[str], recorder: Recorder) -> None:
        self.options = options
        self.page_ids = page_ids
        self.hot = page_ids[: options.hot]
        self.recorder = recorder
        self.tag = secrets.token_hex(2)  # markers of this run only, whatever the seed
        self.start = time.monotonic()
        self.deadline = None if options.duration is None else self.start + options.duration
        self.clients: list[PagesClient] = []
        self.saving: dict[int, str] = {}  # user -> page id of the save in flight

    def more(self, done: int) -> bool:
        """May a user who attempted ``done`` edits start another?"""
        if self.deadline is not None:
            return time.monotonic() < self.deadline
        return done < (self.options.edits_per_user or 0)

    async def think(self, rng: random.Random) -> None:
        """Sleep an exponential think time, cut short at the deadline."""
        delay = rng.expovariate(1.0 / self.options.think) if self.options.think > 0 else 0.0
        if self.deadline is not None:
            delay = min(delay, max(0.0, self.deadline - time.monotonic()))
        await asyncio.sleep(delay)

    async def user(self, http: httpx.AsyncClient, number: int) -> None:
        """One simulated user's loop."""
        options, rec = self.options, self.recorder
        rng = random.Random(f"{options.seed}/user/{number}")
        wait_until = None if self.deadline is None else self.deadline + options.grace
        client = LoadClient(
            http, user=f"user-{number}", max_wait=options.max_wait, wait_until=wait_until
        )
        self.clients.append(client)
        copies: OrderedDict[str, tuple[LocalPage, float]] = OrderedDict()
        await asyncio.sleep(rng.uniform(0.0, options.think))  # users do not start in step
        done = 0
        while self.more(done):
            done += 1
            shared = rng.random() < options.shared
            page_id = rng.choice(self.hot if shared else self.page_ids)
            held = copies.pop(page_id, None)
            if held is None or time.monotonic() - held[1] > options.copy_ttl:
                start = time.perf_counter()
                try:
                    local = await client.open(page_id)
                except (SaveFailed, httpx.HTTPError) as exc:
                    rec.outcomes[f"open failed ({type(exc).__name__})"] += 1
                    await self.think(rng)
                    continue
                rec.open_latencies.append(time.perf_counter() - start)
                held = (local, time.monotonic())
            local = held[0]
            kind, edited, marker = make_edit(rng, local.blocks, f"m{self.tag}u{number}x{done}")
            retries, waits = client.stats.retries_412, client.stats.waits_429
            self.saving[number] = page_id
            start = time.perf_counter()
            try:
                saved = await client.save(local, edited)
            except PatchConflict:
                rec.outcomes["conflict (PatchConflict)"] += 1
            except Abandoned:  # rate limited until after the run: this user is done
                rec.outcomes["abandoned (429 wait past the run)"] += 1
                break
            except SaveFailed as exc:
                rec.outcomes[f"failed ({exc.status})"] += 1
                if exc.status >= 500:
                    rec.ambiguous[page_id] += 1
            except httpx.HTTPError as exc:
                rec.outcomes[f"failed ({type(exc).__name__})"] += 1
                rec.ambiguous[page_id] += 1
            else:
                seconds = time.perf_counter() - start
                rec.outcomes["acknowledged"] += 1
                rec.edit_kinds[kind] += 1
                rec.save_latencies.append(seconds)
                if client.stats.waits_429 == waits:
                    rec.save_latencies_no_429.append(seconds)
                if client.stats.retries_412 > retries:
                    rec.outcomes["acknowledged after a 412 rebase"] += 1
                rec.acks.append(Ack(page_id, saved.version, marker, kind, rec.now(), number))
                copies[page_id] = (saved, time.monotonic())
                while len(copies) > options.open_pages:
                    copies.popitem(last=False)
            finally:
                self.saving.pop(number, None)
            await self.think(rng)


# --- background: metrics sampler, event-loop lag, progress ------------------------------------


@dataclasses.dataclass
class QueueSample:
    """The index queue's depth at one scrape."""

    at: float
    waiting: float
    running: float
    retrying: float

    @property
    def total(self) -> float:
        """Jobs not finished."""
        return self.waiting + self.running + self.retrying


def queue_depth(exposition: str, queue: str = "index") -> dict[str, float]:
    """``hardening_queue_depth{queue=...}`` by state, from a Prometheus text exposition."""
    depth: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        if family.name != "hardening_queue_depth":
            continue
        for sample in family.samples:
            if sample.labels.get("queue") == queue:
                depth[sample.labels.get("state", "")] = sample.value
    return depth


Histograms = dict[str, dict[float, float]]
SERVER_ROUTES = ("PATCH /pages/{page_id}", "GET /pages/{page_id}")


def request_histograms(exposition: str) -> Histograms:
    """``http_server_request_duration_seconds`` buckets by ``"METHOD route"`` (statuses summed)."""
    histograms: Histograms = collections.defaultdict(lambda: collections.defaultdict(float))
    for family in text_string_to_metric_families(exposition):
        if family.name != "http_server_request_duration_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                labels = sample.labels
                key = f"{labels.get('http_request_method')} {labels.get('http_route')}"
                histograms[key][float(labels["le"])] += sample.value
    return histograms


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """PromQL's ``histogram_quantile`` over cumulative ``buckets`` (upper bound -> count)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # above the highest finite bucket: its bound is all we know
            width = count - below
            return lower + (bound - lower) * ((rank - below) / width if width else 1.0)
        lower, below = bound, count
    return lower


def server_latency(before: Histograms, after: Histograms) -> dict[str, dict[str, float | None]]:
    """Server-side latency (ms) per route over the load phase: the difference of two scrapes."""
    table: dict[str, dict[str, float | None]] = {}
    for route in SERVER_ROUTES:
        end, start = after.get(route, {}), before.get(route, {})
        delta = {bound: count - start.get(bound, 0.0) for bound, count in end.items()}
        table[route] = {
            "n": max(delta.values(), default=0.0),
            **{f"p{q}": _to_ms(histogram_quantile(q / 100, delta)) for q in (50, 95, 99)},
        }
    return table


async def scrape_histograms(http: httpx.AsyncClient) -> Histograms:
    """The request-duration histograms from ``/metrics`` (empty if the scrape fails)."""
    try:
        response = await http.get("/metrics")
    except httpx.HTTPError:
        return {}
    return request_histograms(response.text) if response.status_code == 200 else {}


async def sample_metrics(
    http: httpx.AsyncClient, recorder: Recorder, interval: float, samples: list[QueueSample]
) -> None:
    """Scrape ``/metrics`` every ``interval`` seconds (until cancelled)."""
    while True:
        try:
            response = await http.get("/metrics")
            if response.status_code == 200:
                depth = queue_depth(response.text)
                if depth:
                    samples.append(
                        QueueSample(recorder.now(), *(depth.get(s, 0.0) for s in QUEUE_STATES))
                    )
        except httpx.HTTPError:
            recorder.scrape_failures += 1
        await asyncio.sleep(interval)


async def measure_lag(lags: list[float], interval: float = 0.1) -> None:
    """Record how late the event loop wakes (the load generator's own saturation)."""
    while True:
        start = time.perf_counter()
        await asyncio.sleep(interval)
        lags.append(max(0.0, time.perf_counter() - start - interval))


def percentile(values: Sequence[float], q: float, *, presorted: bool = False) -> float | None:
    """The nearest-rank ``q``-th percentile (0-100), or ``None`` without values."""
    if not values:
        return None
    ordered = values if presorted else sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def progress_line(run: Run, samples: list[QueueSample]) -> str:
    """One line: elapsed, saves, req/s, p95 of saves so far, 412/429 counts, queue depth."""
    rec = run.recorder
    elapsed = max(rec.now(), 1e-9)
    statuses = rec.status_total()
    p95 = percentile(rec.save_latencies, 95)
    queue = f"{samples[-1].total:.0f}" if samples else "-"
    return (
        f"[{elapsed:6.1f}s] saves {len(rec.acks)} ({len(rec.acks) / elapsed:.1f}/s)  "
        f"req {rec.requests} ({rec.requests / elapsed:.1f}/s)  "
        f"p95 {_ms(p95)}  412 {statuses[412]}  429 {statuses[429]}  "
        f"conflicts {rec.outcomes['conflict (PatchConflict)']}  5xx {_count_5xx(statuses)}  "
        f"queue {queue}  users saving {len(run.saving)}"
    )


async def show_progress(run: Run, samples: list[QueueSample], stream: TextIO) -> None:
    """Redraw the progress line ~4 times a second on a terminal, else print it every 5 s."""
    tty = stream.isatty()
    try:
        while True:
            await asyncio.sleep(0.25 if tty else 5.0)
            line = progress_line(run, samples)
            stream.write(f"\r{line}\x1b[K" if tty else f"{line}\n")
            stream.flush()
    finally:
        if tty:
            stream.write("\n")
            stream.flush()


# --- setup and verification -------------------------------------------------------------------


SETUP_ATTEMPTS = 3


async def create_pages(
    http: httpx.AsyncClient, options: Options, rng: random.Random, failures: Counter[str]
) -> dict[str, list[str]]:
    """Create the pages, ``setup_concurrency`` at a time; return page id -> block ids.

    A create that fails with a 5xx or without a response is tried again (at most
    ``SETUP_ATTEMPTS`` times; a page it may have made anyway is simply not used) and counted in
    ``failures``.
    """
    contents = [make_page(rng, options.blocks) for _ in range(options.pages)]
    limit = asyncio.Semaphore(options.setup_concurrency)

    async def create(index: int, blocks: Blocks) -> tuple[str, list[str]]:
        # without an admin token each page has its own creator, so the save limit is per page
        client = PagesClient(http, user=f"setup-{index}", token=options.admin_token)
        for attempt in range(1, SETUP_ATTEMPTS + 1):
            try:
                async with limit:
                    page = await client.create(blocks)
                break
            except SaveFailed as exc:
                failures[f"POST /pages {exc.status}"] += 1
                if exc.status < 500 or attempt == SETUP_ATTEMPTS:
                    raise
            except httpx.TransportError as exc:
                failures[f"POST /pages {type(exc).__name__}"] += 1
                if attempt == SETUP_ATTEMPTS:
                    raise
        return page.id, [block["id"] for block in blocks]

    created = await asyncio.gather(*(create(i, b) for i, b in enumerate(contents)))
    return dict(created)


@dataclasses.dataclass
class Verification:
    """What the checks after the run found."""

    pages_checked: int = 0
    markers_checked: int = 0
    missing_markers: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    search_seconds: float | None = None
    search_pages: int = 0
    search_missing: list[str] = dataclasses.field(default_factory=list)

    @property
    def saves_ok(self) -> bool:
        """No acknowledged save lost, versions and blocks as acknowledged."""
        return not self.missing_markers and not self.problems

    @property
    def search_ok(self) -> bool:
        """Search found every page's newest marker in time."""
        return self.search_seconds is not None and not self.search_missing

    @property
    def ok(self) -> bool:
        """Both checks passed."""
        return self.saves_ok and self.search_ok


async def verify_saves(
    http: httpx.AsyncClient,
    pages: dict[str, list[str]],
    acks: list[Ack],
    ambiguous: Counter[str],
    result: Verification,
) -> None:
    """Check every page against the saves acknowledged for it."""
    by_page: dict[str, list[Ack]] = collections.defaultdict(list)
    for ack in acks:
        by_page[ack.page_id].append(ack)
    limit = asyncio.Semaphore(8)

    async def check(page_id: str, original: list[str]) -> None:
        async with limit:
            response = await http.get(f"/pages/{page_id}")
        if response.status_code != 200:
            result.problems.append(f"{page_id}: GET answered {response.status_code}")
            return
        body = response.json()
        version, blocks = int(body["version"]), body["blocks"]
        page_acks, unknown = by_page.get(page_id, []), ambiguous.get(page_id, 0)
        words = {w for block in blocks for w in _TOKEN.findall(block["content"])}
        for ack in page_acks:
            if ack.marker is not None:
                result.markers_checked += 1
                if ack.marker not in words:
                    result.missing_markers.append(f"{page_id}: {ack.marker} (v{ack.version})")
        expected = 1 + len(page_acks)
        if not expected <= version <= expected + unknown:
            result.problems.append(
                f"{page_id}: version {version}, expected {expected} (1 + acknowledged saves)"
                + (f" up to {unknown} more (saves of unknown outcome)" if unknown else "")
            )
        versions = Counter(ack.version for ack in page_acks)
        repeated = sorted(v for v, n in versions.items() if n > 1)
        if repeated:
            result.problems.append(f"{page_id}: versions acknowledged twice: {repeated}")
        if versions and (min(versions) < 2 or max(versions) > version):
            result.problems.append(f"{page_id}: acknowledged versions outside 2..{version}")
        ids = [block["id"] for block in blocks]
        if len(set(ids)) != len(ids):
            result.problems.append(f"{page_id}: duplicate block ids")
        lost = set(original) - set(ids)
        if lost:
            result.problems.append(f"{page_id}: {len(lost)} original blocks lost")
        inserts = sum(ack.kind == "insert" for ack in page_acks)
        if not len(original) + inserts <= len(ids) <= len(original) + inserts + unknown:
            result.problems.append(
                f"{page_id}: {len(ids)} blocks, expected {len(original)} + {inserts} inserted"
            )
        result.pages_checked += 1

    await asyncio.gather(*(check(page_id, ids) for page_id, ids in pages.items()))


async def wait_for_search(
    http: httpx.AsyncClient, acks: list[Ack], timeout: float, result: Verification
) -> None:
    """Poll ``/search`` until each page's newest acknowledged marker finds that page."""
    newest: dict[str, Ack] = {}
    for ack in acks:
        if ack.marker is not None and (
            ack.page_id not in newest or ack.version > newest[ack.page_id].version
        ):
            newest[ack.page_id] = ack
    pending = dict(newest)
    result.search_pages = len(pending)
    limit = asyncio.Semaphore(8)
    start = time.monotonic()

    async def found(ack: Ack) -> bool:
        async with limit:
            response = await http.get("/search", params={"q": ack.marker})
        if response.status_code != 200:
            return False
        return any(hit.get("id") == ack.page_id for hit in response.json().get("results", []))

    while pending:
        hits = await asyncio.gather(*(found(ack) for ack in pending.values()))
        for page_id, hit in zip(list(pending), hits, strict=True):
            if hit:
                del pending[page_id]
        if not pending or time.monotonic() - start > timeout:
            break
        await asyncio.sleep(0.2)
    if pending:
        result.search_missing = [f"{a.page_id}: {a.marker}" for a in pending.values()]
    else:
        result.search_seconds = time.monotonic() - start


# --- the run ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Results:
    """Everything one run measured (``--json`` writes it)."""

    options: Options
    setup_seconds: float
    setup_failures: dict[str, int]
    load_seconds: float
    requests: int
    statuses: dict[str, dict[int, int]]
    errors: dict[str, int]
    outcomes: dict[str, int]
    edit_kinds: dict[str, int]
    latency_ms: dict[str, dict[str, float | int | None]]
    client: dict[str, int]
    queue_samples: list[QueueSample]
    scrape_failures: int
    honoured_429: int
    early_429: int
    generator_cpu: float
    loop_lag_ms: dict[str, float | None]
    server_latency_ms: dict[str, dict[str, float | None]]
    verification: Verification
    acks: list[Ack]

    @property
    def acknowledged(self) -> int:
        """Saves the service acknowledged."""
        return self.outcomes.get("acknowledged", 0)

    def status_total(self) -> Counter[int]:
        """Responses by status over every request of the load phase."""
        total: Counter[int] = Counter()
        for counts in self.statuses.values():
            total.update(counts)
        return total

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        data = dataclasses.asdict(self)
        data["options"].pop("admin_token", None)
        data["acknowledged"] = self.acknowledged
        data["verification"]["ok"] = self.verification.ok
        data["verification"]["saves_ok"] = self.verification.saves_ok
        data["verification"]["search_ok"] = self.verification.search_ok
        return data


def _summary(values: list[float]) -> dict[str, float | int | None]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50": _to_ms(percentile(ordered, 50, presorted=True)),
        "p95": _to_ms(percentile(ordered, 95, presorted=True)),
        "p99": _to_ms(percentile(ordered, 99, presorted=True)),
        "max": _to_ms(ordered[-1] if ordered else None),
    }


def _to_ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 2)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}ms"


def _count_5xx(statuses: Counter[int]) -> int:
    return sum(n for status, n in statuses.items() if status >= 500)


async def run(options: Options, *, stream: TextIO | None = None) -> Results:
    """Set up, load, verify; return the results (nothing printed on stdout).

    Args:
        options: what to run.
        stream: where progress goes (default stderr; only with ``options.progress``).
    """
    rng = random.Random(f"{options.seed}/setup")
    admin_headers = (
        {"Authorization": f"Bearer {options.admin_token}"} if options.admin_token else {}
    )
    timeout = httpx.Timeout(options.timeout)
    size = options.connections or options.users + 8
    limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
    recorder = Recorder(options.max_wait)
    transport = TimingTransport(httpx.AsyncHTTPTransport(limits=limits), recorder)
    async with (
        httpx.AsyncClient(base_url=options.url, timeout=timeout, headers=admin_headers) as admin,
        httpx.AsyncClient(base_url=options.url, timeout=timeout, transport=transport) as http,
    ):
        started = time.monotonic()
        setup_failures: Counter[str] = Counter()
        pages = await create_pages(admin, options, rng, setup_failures)
        setup_seconds = time.monotonic() - started

        histograms_before = await scrape_histograms(admin)
        recorder.started = time.monotonic()
        state = Run(options, list(pages), recorder)
        samples: list[QueueSample] = []
        lags: list[float] = []
        background = [
            asyncio.ensure_future(
                sample_metrics(admin, recorder, options.scrape_interval, samples)
            ),
            asyncio.ensure_future(measure_lag(lags)),
        ]
        if options.progress:
            background.append(
                asyncio.ensure_future(show_progress(state, samples, stream or sys.stderr))
            )
        cpu = time.process_time()
        users = [asyncio.ensure_future(state.user(http, n)) for n in range(options.users)]
        try:
            await _finish(users, state)
        finally:
            load_seconds = recorder.now()
            cpu = time.process_time() - cpu
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
        histograms_after = await scrape_histograms(admin)
        verification = Verification()
        await verify_saves(admin, pages, recorder.acks, recorder.ambiguous, verification)
        await wait_for_search(admin, recorder.acks, options.search_timeout, verification)

    stats: Counter[str] = Counter()
    for client in state.clients:
        stats.update({k: v for k, v in dataclasses.asdict(client.stats).items() if k != "statuses"})
    latency = {
        "save (as the user waited)": _summary(recorder.save_latencies),
        "save (no 429 wait)": _summary(recorder.save_latencies_no_429),
        "open (GET, no local copy)": _summary(recorder.open_latencies),
        **{f"{kind} request": _summary(v) for kind, v in sorted(recorder.latencies.items())},
        "every request": _summary([x for v in recorder.latencies.values() for x in v]),
    }
    return Results(
        options=options,
        setup_seconds=setup_seconds,
        setup_failures=dict(setup_failures),
        load_seconds=load_seconds,
        requests=recorder.requests,
        statuses={k: dict(v) for k, v in recorder.statuses.items()},
        errors=dict(recorder.errors),
        outcomes=dict(recorder.outcomes),
        edit_kinds=dict(recorder.edit_kinds),
        latency_ms=latency,
        client=dict(stats),
        queue_samples=samples,
        scrape_failures=recorder.scrape_failures,
        honoured_429=recorder.honoured_429,
        early_429=recorder.early_429,
        generator_cpu=cpu / load_seconds if load_seconds > 0 else 0.0,
        loop_lag_ms={
            "p50": _to_ms(percentile(lags, 50)),
            "p99": _to_ms(percentile(lags, 99)),
            "max": _to_ms(max(lags) if lags else None),
        },
        server_latency_ms=server_latency(histograms_before, histograms_after),
        verification=verification,
        acks=recorder.acks,
    )


async def _finish(users: list[asyncio.Task[None]], state: Run) -> None:
    """Wait for the users; past the deadline, grace and a timeout, cancel the stragglers."""
    if state.deadline is None:
        await asyncio.gather(*users)
        return
    cutoff = state.deadline + state.options.grace + state.options.timeout + 5.0
    _, late = await asyncio.wait(users, timeout=max(0.0, cutoff - time.monotonic()))
    for task in late:
        task.cancel()
    for page_id in state.saving.values():  # cancelled mid-save: it may have committed
        state.recorder.ambiguous[page_id] += 1
        state.recorder.outcomes["cancelled mid-save"] += 1
    await asyncio.gather(*users, return_exceptions=True)
    for task in users:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise error


# --- the report -------------------------------------------------------------------------------


def sparkline(values: Sequence[float], width: int = 60, ascii_only: bool = False) -> str:
    """``values`` as a one-line chart of at most ``width`` characters (bucket maxima)."""
    if not values:
        return ""
    marks = " .:-=+*#%@" if ascii_only else " ▁▂▃▄▅▆▇█"
    step = max(1, math.ceil(len(values) / width))
    points = [max(values[i : i + step]) for i in range(0, len(values), step)]
    top = max(points)
    if top <= 0:
        return marks[0] * len(points)
    return "".join(marks[round(p / top * (len(marks) - 1))] for p in points)


def report(results: Results, out: TextIO) -> None:
    """Write the final table."""
    o, v = results.options, results.verification
    statuses = results.status_total()
    load = max(results.load_seconds, 1e-9)

    def write(line: str = "") -> None:
        out.write(line + "\n")

    length = f"{o.duration:g} s" if o.duration is not None else f"{o.edits_per_user} edits/user"
    write(
        f"pages service load test: {o.users} users, {o.pages} pages x {o.blocks} blocks, "
        f"think {o.think:g} s, shared {o.shared:g} ({o.hot} hot), {length}; {o.url}"
    )
    retried = ", ".join(f"{k}: {n}" for k, n in sorted(results.setup_failures.items()))
    write(
        f"setup {results.setup_seconds:.1f} s"
        + (f" (retried after {retried})" if retried else "")
        + f", load {results.load_seconds:.1f} s"
    )
    write()
    write(f"{'throughput':<34}{'count':>9}{'per s':>10}")
    write(f"{'  requests':<34}{results.requests:>9}{results.requests / load:>10.1f}")
    write(
        f"{'  acknowledged saves':<34}{results.acknowledged:>9}{results.acknowledged / load:>10.1f}"
    )
    write()
    write(f"{'latency (ms)':<34}{'n':>7}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}")
    for name, row in results.latency_ms.items():
        cells = "".join(
            f"{'-' if row[k] is None else format(row[k], '.1f'):>9}"
            for k in ("p50", "p95", "p99", "max")
        )
        write(f"  {name:<32}{row['n']:>7}{cells}")
    for route, row in results.server_latency_ms.items():
        cells = "".join(
            f"{'-' if row[k] is None else format(row[k], '.1f'):>9}" for k in ("p50", "p95", "p99")
        )
        write(f"  {'server ' + route:<32}{row['n'] or 0:>7.0f}{cells}")
    write(
        "  (server rows: the service's own http_server_request_duration_seconds buckets, "
        "interpolated; n counts the requests of the process(es) the scrape reached)"
    )
    write()
    codes = [200, 201, 304, 409, 412, 428, 429]
    line = "  ".join(f"{code}: {statuses[code]}" for code in codes)
    others = sorted(c for c in statuses if c not in codes and c < 500)
    extra = "".join(f"  {c}: {statuses[c]}" for c in others)
    errors = sum(results.errors.values())
    write(f"responses  {line}{extra}  5xx: {_count_5xx(statuses)}  no response: {errors}")
    for kind, counts in sorted(results.statuses.items()):
        write(f"  {kind:<16}" + "  ".join(f"{c}: {n}" for c, n in sorted(counts.items())))
    for name, count in sorted(results.errors.items()):
        write(f"  error {name}: {count}")
    write()
    write("saves      " + ", ".join(f"{k}: {n}" for k, n in sorted(results.outcomes.items())))
    write("edits      " + ", ".join(f"{k}: {n}" for k, n in sorted(results.edit_kinds.items())))
    c = results.client
    write(
        f"client     412 rebases: {c.get('retries_412', 0)}, 429 waits: {c.get('waits_429', 0)} "
        f"(honoured {results.honoured_429}, early {results.early_429}), "
        f"conflicts: {c.get('conflicts', 0)}"
    )
    patch, full = c.get("patch_bytes", 0), c.get("full_bytes", 0)
    ratio = f"{patch / full:.2%}" if full else "-"
    per = f"{patch / max(c.get('saves', 0), 1):.0f}"
    write(f"bytes      patches {patch:,} (avg {per}/save) vs full pages {full:,}: {ratio}")
    write()
    samples = results.queue_samples
    failed = f", {results.scrape_failures} scrapes failed" if results.scrape_failures else ""
    if samples:
        ascii_only = "utf" not in (getattr(out, "encoding", None) or "").lower()
        totals = [s.total for s in samples]
        most = {state: max(getattr(s, state) for s in samples) for state in QUEUE_STATES}
        write(
            "queue      index: max "
            + ", ".join(f"{state} {n:.0f}" for state, n in most.items())
            + f" ({len(samples)} scrapes{failed})"
        )
        write(f"  over time |{sparkline(totals, ascii_only=ascii_only)}| max {max(totals):.0f}")
        picks = sorted({round(i * (len(samples) - 1) / 5) for i in range(6)})
        write("  samples   " + ", ".join(f"{samples[i].at:.0f}s: {totals[i]:.0f}" for i in picks))
    else:
        write("queue      no hardening_queue_depth samples scraped")
    lag = results.loop_lag_ms
    write(
        f"generator  CPU {results.generator_cpu:.0%} of a core; event-loop lag p50 "
        f"{lag['p50']} ms, p99 {lag['p99']} ms, max {lag['max']} ms"
    )
    write()
    write("verification")
    if v.saves_ok:
        write(
            f"  (1) no acknowledged save lost: OK ({results.acknowledged} saves, "
            f"{v.markers_checked} markers on {v.pages_checked} pages; versions = 1 + saves)"
        )
    else:
        write(f"  (1) acknowledged saves: FAILED ({len(v.missing_markers)} markers missing)")
        for problem in [*v.missing_markers, *v.problems][:20]:
            write(f"      {problem}")
    if v.search_ok:
        write(f"  (2) search caught up: OK, {v.search_pages} pages in {v.search_seconds:.2f} s")
    else:
        write(f"  (2) search caught up: FAILED, {len(v.search_missing)} pages not found")
        for missing in v.search_missing[:10]:
            write(f"      {missing}")
    write(f"RESULT: {'PASS' if v.ok else 'FAIL'}")


async def amain(argv: Sequence[str] | None = None) -> int:
    """Run the load test from the command line's options; the exit status."""
    options = parse_args(argv)
    try:
        results = await run(options)
    except (SaveFailed, httpx.HTTPError) as exc:
        print(f"load test failed: {exc}", file=sys.stderr)
        return 2
    report(results, sys.stdout)
    if options.json_path:
        with open(options.json_path, "w", encoding="utf-8") as file:
            json.dump(results.to_json(), file, indent=2, default=str)
    return 0 if results.verification.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m examples.loadtest``."""
    return asyncio.run(amain(argv))


if __name__ == "__main__":
    sys.exit(main())
