"""The simulated users: page contents, the edits they make, and each user's edit loop."""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections import OrderedDict
from typing import Any

import httpx

from examples.loadtest.options import Options
from examples.loadtest.recording import Ack, Recorder
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
MAX_CONTENT = 19_000  # the service takes up to 20,000 characters per block


class Abandoned(Exception):
    """A save gave up waiting out a 429: the wait would end past the run's deadline."""


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


Edit = tuple[str, Blocks, "str | None", "list[dict[str, Any]]"]


def make_edit(rng: random.Random, blocks: Blocks, marker: str) -> Edit:
    """One small edit of ``blocks``: ``(kind, edited blocks, marker or None, patch)``.

    ``append`` adds the marker to a block's text, ``insert`` adds a block holding it, ``move``
    moves a block (no marker). Blocks are never removed, nor text; ``blocks`` is not changed.
    The patch is the edit's own JSON Patch, as an editor that knows what the user did sends it
    (no diff of the whole page: on a 10,000-block page ``diff_blocks`` costs the generator
    ~17 ms a save).
    """
    roll = rng.random()
    if roll < 0.15 and len(blocks) >= 2:
        edited = list(blocks)
        source = rng.randrange(len(edited))
        moved = edited.pop(source)
        target = rng.randrange(len(edited) + 1)
        edited.insert(target, moved)
        if target != source:
            return (
                "move",
                edited,
                None,
                [{"op": "move", "from": f"/{source}", "path": f"/{target}"}],
            )
    index = rng.randrange(len(blocks)) if blocks else 0
    if roll < 0.40 or not blocks or len(blocks[index]["content"]) > MAX_CONTENT:
        new = make_block(rng, marker.replace("m", "b", 1))
        new["content"] = f"{new['content']} {marker}"
        ops = [{"op": "add", "path": f"/{index}", "value": new}]
        return "insert", [*blocks[:index], new, *blocks[index:]], marker, ops
    block = blocks[index]
    changed = {**block, "content": f"{block['content']} {marker}"}
    ops = [{"op": "replace", "path": f"/{index}/content", "value": changed["content"]}]
    return "append", [*blocks[:index], changed, *blocks[index + 1 :]], marker, ops


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


def run_tag() -> str:
    """A fresh tag for one run's markers (so they are this run's only, whatever the seed)."""
    return secrets.token_hex(2)


class Run:
    """The shared state of one generator process's load phase.

    Args:
        options: what to run.
        page_ids: every page of the run (the first ``options.hot`` are the hot ones).
        recorder: where this process's measurements go.
        tag: the run's marker tag (the same in every process; default: a fresh one).
        process: this generator process's number (recorded on each :class:`Ack`).
    """

    def __init__(
        self,
        options: Options,
        page_ids: list[str],
        recorder: Recorder,
        *,
        tag: str | None = None,
        process: int = 0,
    ) -> None:
        self.options = options
        self.page_ids = page_ids
        self.hot = page_ids[: options.hot]
        self.recorder = recorder
        self.tag = tag or run_tag()
        self.process = process
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
        page_id: str | None = None
        while self.more(done):
            done += 1
            if page_id is None or rng.random() * options.stay < 1.0:  # move on
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
            kind, edited, marker, ops = make_edit(rng, local.blocks, f"m{self.tag}u{number}x{done}")
            retries, waits = client.stats.retries_412, client.stats.waits_429
            self.saving[number] = page_id
            start = time.perf_counter()
            try:
                saved = await client.save(local, edited, ops=ops)
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
                rec.acks.append(
                    Ack(page_id, saved.version, marker, kind, rec.now(), number, self.process)
                )
                copies[page_id] = (saved, time.monotonic())
                while len(copies) > options.open_pages:
                    copies.popitem(last=False)
            finally:
                self.saving.pop(number, None)
            await self.think(rng)
