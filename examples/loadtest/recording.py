"""What one generator process measures: acknowledged saves, latencies, statuses, errors."""

from __future__ import annotations

import collections
import dataclasses
import time
from collections import Counter

import httpx

SAVE_METHODS = frozenset({"POST", "PATCH", "PUT"})


@dataclasses.dataclass
class Ack:
    """One acknowledged save (``process``: the generator process whose user made it)."""

    page_id: str
    version: int
    marker: str | None
    kind: str
    at: float
    user: int
    process: int = 0


def request_kind(request: httpx.Request) -> str:
    """``PATCH page``, ``GET page``, ``POST pages``, ``GET search``... for the tables."""
    path = request.url.path
    if path.startswith("/pages/") and path.endswith("/patches"):
        return f"{request.method} patches"
    if path.startswith("/pages/"):
        return f"{request.method} page"
    if path == "/pages":
        return f"{request.method} pages"
    return f"{request.method} {path.strip('/') or '/'}"


class Recorder:
    """Everything one generator process's load phase measures; fed by the transport and users."""

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
