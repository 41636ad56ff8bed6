"""A pages client that keeps a local copy and sends only patches (the seeds' debounced client).

- :class:`PagesClient` opens a page (blocks + version), and :meth:`PagesClient.save` sends
  ``diff_blocks(local, edited)`` as ``application/json-patch+json`` with ``If-Match``. On
  **412** (someone saved first) it re-fetches the page, rebases its patch onto theirs with
  :func:`hardening.rebase` (block by block, field by field), and retries; a true conflict
  (both changed the same field of the same block) raises :class:`~hardening.PatchConflict`.
  On **429** it waits ``Retry-After`` and retries.
- :class:`Debouncer` coalesces rapid local edits into one save after a quiet period.

Works with both example services (ASGI ``pages_service``, WSGI ``flask_pages``)::

    async with httpx.AsyncClient(base_url="http://127.0.0.1:8000") as http:
        client = PagesClient(http, user="ana")
        page = await client.create([{"id": "a", "type": "p", "content": "Hello"}])
        edited = [{**page.blocks[0], "content": "Hello, world"}]
        page = await client.save(page, edited)
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from hardening import PatchConflict, PatchError, apply_patch, diff_blocks, etag_for, rebase

Blocks = list[dict[str, Any]]
PATCH_TYPE = "application/json-patch+json"


class SaveFailed(Exception):
    """The server refused a save for a reason retrying cannot fix (4xx other than 412/429)."""

    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        self.problem = _problem(response)
        super().__init__(f"save refused: {self.status} {self.problem.get('title', '')}")


def _problem(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return body if isinstance(body, dict) else {}


@dataclass
class LocalPage:
    """The client's copy of a page: the version the server acknowledged and its blocks.

    ``blocks`` is treated as a value: the client never changes it in place, and neither should
    the caller (build an edit as a new list, e.g. ``[*blocks[:i], changed, *blocks[i + 1:]]``).
    ``size`` is the page's JSON size in bytes as last received or sent whole (for statistics).
    """

    id: str
    version: int
    blocks: Blocks
    size: int = 0

    @property
    def etag(self) -> str:
        """The entity tag to send in ``If-Match``."""
        return etag_for(self.version)


@dataclass
class SaveStats:
    """What saving cost: counts a load test reports."""

    saves: int = 0
    retries_412: int = 0
    caught_up: int = 0  # 412s answered by the saves since, not the whole page
    waits_429: int = 0
    conflicts: int = 0
    patch_bytes: int = 0
    full_bytes: int = 0
    statuses: dict[int, int] = field(default_factory=dict)

    def count(self, status: int) -> None:
        """Count one response status."""
        self.statuses[status] = self.statuses.get(status, 0) + 1


class PagesClient:
    """Talks to a pages service over HTTP, sending patches against a local copy.

    Args:
        http: an ``httpx.AsyncClient`` with the service's ``base_url``.
        user: sent as ``X-User`` (the examples' stand-in for authentication).
        token: sent as ``Authorization: Bearer`` (an ``API_TOKENS`` or admin token).
        max_retries: 412 rebases / 429 waits per save before giving up.
        max_wait: the longest ``Retry-After`` honoured, in seconds.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        user: str | None = None,
        token: str | None = None,
        max_retries: int = 8,
        max_wait: float = 60.0,
    ) -> None:
        self.http = http
        self.headers: dict[str, str] = {}
        if user:
            self.headers["X-User"] = user
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.max_retries = max_retries
        self.max_wait = max_wait
        self.stats = SaveStats()

    async def create(self, blocks: Blocks) -> LocalPage:
        """Create a page; return the local copy at version 1."""
        response = await self._send("POST", "/pages", json={"blocks": blocks})
        body = response.json()
        size = len(response.request.content)
        return LocalPage(body["id"], body["version"], copy.deepcopy(blocks), size)

    async def open(self, page_id: str) -> LocalPage:
        """Fetch a page's current version."""
        response = await self.http.get(f"/pages/{page_id}", headers=self.headers)
        self.stats.count(response.status_code)
        if response.status_code != 200:
            raise SaveFailed(response)
        body = response.json()
        return LocalPage(body["id"], body["version"], body["blocks"], len(response.content))

    async def catch_up(self, page: LocalPage) -> tuple[LocalPage, list[list[Any]]]:
        """The server's head and the patches from ``page`` to it.

        Asks for the saves since ``page.version`` and applies them to a copy of the local
        blocks: a request the size of the edits, not of the page. When the server no longer
        has them all (404/410) or they do not apply, fetches the whole page and diffs.
        """
        response = await self.http.get(
            f"/pages/{page.id}/patches", params={"since": page.version}, headers=self.headers
        )
        self.stats.count(response.status_code)
        if response.status_code == 200:
            body = response.json()
            blocks = page.blocks
            try:
                for patch in body["patches"]:  # copying only what each patch changes
                    blocks = apply_patch(blocks, patch, limits=None, share=True)
            except PatchError:
                pass  # not what the server has: fetch the page below
            else:
                self.stats.caught_up += 1
                return LocalPage(page.id, body["version"], blocks, page.size), body["patches"]
        theirs = await self.open(page.id)
        return theirs, [diff_blocks(page.blocks, theirs.blocks)]

    async def save(
        self, page: LocalPage, edited: Blocks, *, ops: list[dict[str, Any]] | None = None
    ) -> LocalPage:
        """Save ``edited`` (the user's version of ``page.blocks``) as a patch.

        ``edited`` becomes the new local copy's blocks when the save lands as it is (no copy
        of the page per save): do not change it in place afterwards. ``ops``: the edit's own
        patch from ``page.blocks`` to ``edited``, when the editor knows it (then the page is
        not diffed: what the edit costs, not the page); by default ``diff_blocks``.

        Returns:
            The new local copy: the blocks the server now has, at the new version.

        Raises:
            PatchConflict: the edit clashes with a concurrent one on the same field.
            SaveFailed: the server refused the patch (400/413/415/422...), or retries ran out.
        """
        base = page.blocks
        if ops is None:
            ops = diff_blocks(page.blocks, edited)
        if not ops:
            return page
        current, version = edited, page.version
        for _ in range(self.max_retries + 1):
            body = json.dumps(ops, separators=(",", ":")).encode()
            response = await self._patch(page.id, body, version)
            if response.status_code == 200:
                self.stats.saves += 1
                self.stats.patch_bytes += len(body)
                self.stats.full_bytes += page.size  # the whole page, as last fetched
                return LocalPage(page.id, response.json()["version"], current, page.size)
            if response.status_code == 412:  # someone saved first: rebase onto theirs
                self.stats.retries_412 += 1
                theirs, head_patches = await self.catch_up(LocalPage(page.id, version, base))
                try:
                    ops = rebase(ops, base=base, head_patches=head_patches)
                except PatchConflict:
                    self.stats.conflicts += 1
                    raise
                base, version = theirs.blocks, theirs.version
                current = apply_patch(theirs.blocks, ops, share=True)
                continue
            if response.status_code == 429:
                self.stats.waits_429 += 1
                await asyncio.sleep(self._retry_after(response))
                continue
            raise SaveFailed(response)
        raise SaveFailed(response)

    async def _patch(self, page_id: str, body: bytes, version: int) -> httpx.Response:
        headers = {**self.headers, "Content-Type": PATCH_TYPE, "If-Match": etag_for(version)}
        response = await self.http.patch(f"/pages/{page_id}", content=body, headers=headers)
        self.stats.count(response.status_code)
        return response

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        for _ in range(self.max_retries + 1):
            response = await self.http.request(method, url, headers=self.headers, **kwargs)
            self.stats.count(response.status_code)
            if response.status_code != 429:
                break
            self.stats.waits_429 += 1
            await asyncio.sleep(self._retry_after(response))
        if response.status_code >= 400:
            raise SaveFailed(response)
        return response

    def _retry_after(self, response: httpx.Response) -> float:
        try:
            seconds = float(response.headers.get("retry-after", "1"))
        except ValueError:
            seconds = 1.0
        return min(max(seconds, 0.0), self.max_wait)


class Debouncer:
    """Coalesce rapid edits of one page into a save after ``delay`` seconds of quiet.

    Args:
        client: the client that saves.
        page: the page's local copy.
        delay: seconds without an edit before the save goes out.

    ``edit(change)`` applies ``change`` (a function of the blocks, returning the new blocks) to
    the working copy at once; ``flush()`` saves now and waits for it.
    """

    def __init__(self, client: PagesClient, page: LocalPage, delay: float = 0.5) -> None:
        self.client = client
        self.page = page
        self.working: Blocks = copy.deepcopy(page.blocks)
        self.delay = delay
        self._timer: asyncio.TimerHandle | None = None
        self._saving: asyncio.Task[None] | None = None

    def edit(self, change: Callable[[Blocks], Blocks]) -> None:
        """Apply a local change and (re)start the quiet-period timer."""
        self.working = change(self.working)
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.delay, self._start_save)

    def _start_save(self) -> None:
        self._timer = None
        if self._saving is None or self._saving.done():
            self._saving = asyncio.ensure_future(self._save())

    async def _save(self) -> None:
        sent = copy.deepcopy(self.working)
        saved = await self.client.save(self.page, sent)
        self.page = saved
        if self.working == sent:
            self.working = copy.deepcopy(saved.blocks)  # rebased: take the merged page
        else:  # edited meanwhile: carry those edits over onto what the server has
            ops = rebase(
                diff_blocks(sent, self.working),
                base=sent,
                head_patches=[diff_blocks(sent, saved.blocks)],
            )
            self.working = apply_patch(saved.blocks, ops)  # a copy: the working one is ours

    async def flush(self) -> LocalPage:
        """Save pending edits now; return the saved page."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._saving is not None:
            await self._saving
        if diff_blocks(self.page.blocks, self.working):
            self._saving = asyncio.ensure_future(self._save())
            await self._saving
        return self.page
