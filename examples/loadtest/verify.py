"""Setup (create the pages) and verification (no acknowledged save lost, search caught up).

Both run once, in the main process, over every generator process's merged results.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random
import re
import time
from collections import Counter
from collections.abc import Mapping

import httpx

from examples.loadtest.options import Options
from examples.loadtest.recording import Ack
from examples.loadtest.users import make_page
from examples.pages_service.client import Blocks, PagesClient, SaveFailed

_TOKEN = re.compile(r"\w+", re.UNICODE)
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
    ambiguous: Mapping[str, int],
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
