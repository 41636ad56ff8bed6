"""Documented usage that ``mypy --strict`` checks (run by the ``type`` tox env)."""

from __future__ import annotations

from datetime import timedelta

import hardening
from hardening import ConflictError, FakeClock, HardeningError, RateLimitExceeded

clock: hardening.Clock = FakeClock()
now: float = clock.time()
FakeClock().advance(timedelta(seconds=1))

try:
    raise ConflictError("Page", 1, expected_version=1, current_version=2)
except ConflictError as exc:
    expected: int | None = exc.expected_version
    status: int = exc.http_status
except RateLimitExceeded as exc:
    wait: float = exc.retry_after
except HardeningError as exc:
    data: dict[str, object] = exc.details()

version: str = hardening.__version__

# --- rate limiting ---------------------------------------------------------------------
from hardening import AsyncRateLimiter, RateLimitDecision, RateLimiter, RequestInfo, ip_key

limiter = RateLimiter("30/minute;500/hour", block_for=60, tiers={"pro": 5, "ent": None})
decision: RateLimitDecision = limiter.hit("user:1", cost=2, tier="pro")
remaining: int = decision.remaining
retry_after: float | None = decision.retry_after
headers: dict[str, str] = decision.headers()


@limiter.limit(key=lambda user: f"user:{user}")
def save(user: str) -> int:
    return 1


saved: int = save("ana")
async_limiter = AsyncRateLimiter("10/second", strategy="moving-window")


async def check() -> bool:
    return (await async_limiter.hit("k")).allowed


key_of = ip_key(["10.0.0.0/8"])
key: str | None = key_of(RequestInfo(client="10.0.0.1"))

# --- metrics -----------------------------------------------------------------------------
from prometheus_client import Counter as PromCounter

from hardening import GuardedHistogram, HistogramTimer, HttpRequestTimer, Metrics

metrics = Metrics("app", max_label_values=50, clock=FakeClock())
save_errors = metrics.counter("save_errors_total", "Failed saves.", ["error_type"])
conflicts: PromCounter = save_errors.labels(error_type="ConflictError")
conflicts.inc()
save_seconds: GuardedHistogram = metrics.histogram(
    "save_seconds", "Save time.", ["error_type"], buckets=(0.1, 0.5, 1.0)
)
metrics.gauge("queue_depth", "Depth.", multiprocess_mode="livemostrecent").set(3)
save_timer: HistogramTimer = metrics.timer("save_seconds")


@metrics.timer("save_seconds")
async def save_page(page_id: int) -> str:
    return str(page_id)


@save_seconds.time()
def save_block(block_id: int) -> int:
    return block_id


block: int = save_block(1)
request: HttpRequestTimer = metrics.track_http_request("GET")
request_seconds: float = request.finish(200, "/pages/{page_id}", None)
metrics.http_request("POST", None, 500, 0.2, "RuntimeError", exemplar={"trace_id": "t"})
metrics.rate_limit_decision("api", "denied")
metrics.job_finished("indexing", "succeeded", 0.5)
metrics_body, metrics_type = metrics.render("application/openmetrics-text")
scrape_body: bytes = metrics_body
scrape_headers: dict[str, str] = metrics.render_response(None, "gzip")[1]

# --- optimistic locking ----------------------------------------------------------------
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from hardening import (
    Backoff,
    ConflictError,
    Versioned,
    check_if_match,
    check_if_none_match,
    etag_for,
    if_match_version,
    on_conflict,
    retry_on_conflict,
    update_versioned,
)


class _Base(DeclarativeBase):
    pass


class Doc(Versioned, _Base):
    __tablename__ = "docs"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str]


def save_doc(conn: sa.Connection, version: int) -> int:
    return update_versioned(conn, Doc, 1, version, {"body": "new"})


@retry_on_conflict(attempts=5, backoff=Backoff(base=0.01))
def save_with_retry(conn: sa.Connection) -> int:
    current: int = conn.execute(sa.select(Doc.version).where(Doc.id == 1)).scalar_one()
    return save_doc(conn, current)


def broadcast(error: ConflictError) -> None:
    print(error.entity, error.current_version)


unsubscribe = on_conflict(broadcast)
tag: str = etag_for(3)
check_if_match(tag, 3, required=True)
base: int | None = if_match_version(tag)
not_modified: bool = check_if_none_match(tag, 3, method="HEAD")
create_if_absent: bool = check_if_none_match("*", None, method="PUT")

# --- block differ ------------------------------------------------------------------------
from sqlalchemy.ext.asyncio import AsyncEngine

from hardening import (
    AsyncDocumentHistory,
    ConflictPolicy,
    DocumentHistory,
    DocumentVersion,
    HistoryCorrupted,
    HistoryReport,
    PatchConflict,
    PatchError,
    PatchLimits,
    SnapshotPolicy,
    apply_patch,
    diff,
    diff_blocks,
    rebase,
    validate_patch,
)

old_blocks: list[dict[str, object]] = [{"id": "a", "text": "x"}]
new_blocks: list[dict[str, object]] = [{"id": "a", "text": "y"}, {"id": "b", "text": ""}]
block_ops: list[dict[str, object]] = diff_blocks(old_blocks, new_blocks, guards=True)
page_ops: list[dict[str, object]] = diff({"blocks": old_blocks}, {"blocks": new_blocks})
patched: list[dict[str, object]] = apply_patch(old_blocks, block_ops, in_place=False)
page: dict[str, object] = apply_patch({"blocks": old_blocks}, page_ops, limits=PatchLimits())
checked: list[dict[str, object]] = validate_patch(block_ops, limits=None)
rebased: list[dict[str, object]] = rebase(page_ops, base={"blocks": old_blocks}, head_patches=[])

try:
    apply_patch(page, [{"op": "test", "path": "/blocks/0/id", "value": "b"}])
except PatchConflict as clash:
    block_id: str | int | float | bool | None = clash.block_id
    field: str | None = clash.field
except PatchError as refused:
    failing: int | None = refused.op_index
    reason: str = refused.reason

policy: ConflictPolicy = "rebase"
history = DocumentHistory(
    sa.create_engine("sqlite://"),
    snapshots=SnapshotPolicy(every=20, max_patch_bytes=1 << 20, replay_ratio=None),
    conflict=policy,
    metrics=metrics,
)
history.create_schema()
first: int = history.create("page", {"blocks": old_blocks})
second: int = history.save("page", page_ops, base_version=first)
loaded: DocumentVersion = history.load("page", version=1)
loaded_content: object = loaded.content
kept_versions: list[int] = history.versions("page")
oldest: int = history.compact("page", keep=10)
report: HistoryReport = history.verify("page")
sound: bool = report.ok and report.problem is None
try:
    history.load("page", version=1)
except HistoryCorrupted as damaged:
    damaged_at: tuple[str, int, str] = (damaged.doc_id, damaged.version, damaged.reason)
due: bool = SnapshotPolicy().due(patches=3, patch_bytes=100, snapshot_bytes=1000)


async def save_async(engine: AsyncEngine) -> DocumentVersion:
    async_history = AsyncDocumentHistory(engine, conflict="last-write-wins")
    await async_history.save("page", page_ops, base_version=2)
    verified: HistoryReport = await async_history.verify("page")
    assert verified.checked >= 1
    return await async_history.load("page")


# --- cache -------------------------------------------------------------------------------------
from hardening import (
    DEFAULT_TTL_PROFILES,
    AsyncCache,
    Cache,
    CacheStats,
    JSONSerializer,
    PickleSerializer,
    Serializer,
    ValueTooLarge,
)
from hardening.adapters.asgi import CacheMiddleware as ASGICacheMiddleware
from hardening.adapters.wsgi import CacheMiddleware as WSGICacheMiddleware

cache = Cache(
    namespace="pages",
    default_ttl="project",
    profiles={**DEFAULT_TTL_PROFILES, "user": timedelta(minutes=10)},
    serializer=JSONSerializer(),
    metrics=metrics,
    max_entries=1000,
    on_backend_error="miss",
)
serializer: Serializer = PickleSerializer()
cache.set("project:42", {"title": "Docs"}, ttl="project", tags=["project:42"])
cached_project: object = cache.get("project:42")
cached_many: dict[str, object] = cache.get_many(["project:42", "project:43"])
cache.set_many({"block:1": [1], "block:2": [2]}, ttl=timedelta(minutes=1))
loaded_title: str = cache.get_or_set("title:42", lambda: "Docs", ttl=60.0, tags=["project:42"])
invalidated: int = cache.invalidate_tags(["project:42"]) + cache.invalidate_prefix("block:")
deleted: bool = cache.delete("project:42")
cache_stats: CacheStats = cache.stats()
ratio: float = cache_stats.hit_ratio


@cache.cached(ttl="block", key="block:{block_id}", tags=["block:{block_id}"])
def load_block(block_id: int) -> dict[str, int]:
    return {"id": block_id}


cached_block: dict[str, int] = load_block(1)
try:
    cache.set("huge", "x" * 2_000_000)
except ValueTooLarge as too_large:
    too_large_size: int = too_large.size
async_cache = AsyncCache("memory://", namespace="api", jitter=0.0)


@async_cache.cached(ttl=30)
async def load_theme(name: str) -> str:
    return name


async def read_theme() -> str:
    async def load() -> str:
        return "dark"

    value: str = await async_cache.get_or_set("theme", load, ttl="theme")
    await async_cache.invalidate_tags("theme")
    return value + await load_theme("light")


asgi_cached = ASGICacheMiddleware(
    lambda scope, receive, send: send({"type": "noop"}),
    async_cache,
    ttl="project",
    paths={"/projects/{project_id}/**": ["project:{project_id}"]},
    invalidate_on={"PUT,PATCH,DELETE /projects/{project_id}/**": ["project:{project_id}"]},
)
wsgi_cached = WSGICacheMiddleware(lambda environ, start_response: [], cache, max_age=0)
