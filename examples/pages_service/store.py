"""The pages service without HTTP: settings, storage, the search index and its worker.

Both example apps (``pages_service`` on ASGI, ``flask_pages`` on WSGI) are thin HTTP layers
over :class:`PageStore`, which uses only the public API of ``hardening``:

- a page is an ordered list of blocks ``{"id", "type", "content"}`` kept by a
  :class:`~hardening.DocumentHistory` (head row guarded by the optimistic lock, a patch row per
  save, snapshots by :class:`~hardening.SnapshotPolicy`, any version rebuildable);
- a save validates and applies the client's JSON Patch, bumps the version with
  ``update_versioned``, and enqueues an indexing job **in the same transaction** (deduplicated
  per page), so a committed save always has its indexing job and a rolled-back one never does;
- :class:`IndexWorker`, a :class:`~hardening.QueueProcessor`, rebuilds a page's words in a
  plain ``page_words`` table (SQLite and PostgreSQL alike) that ``search`` reads.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session

from hardening import (
    ConflictError,
    DocumentHistory,
    InvalidPatch,
    Job,
    MalformedBody,
    Metrics,
    NotFoundError,
    PatchApplyError,
    PatchLimits,
    PreconditionFailed,
    QueueProcessor,
    SnapshotPolicy,
    diff_blocks,
    etag_for,
)
from hardening.queue.backends.sql import SQLBackend

logger = logging.getLogger("pages_service")

WorkerMode = Literal["inprocess", "external", "off"]
QUEUE = "index"
MAX_BLOCKS = 5_000
MAX_CONTENT = 20_000
_WORD = re.compile(r"\w{2,40}", re.UNICODE)


@dataclass(frozen=True)
class Settings:
    """Everything the service is configured with; :meth:`from_env` reads the environment.

    Attributes:
        database_url: SQLAlchemy URL (``DATABASE_URL``; default a SQLite file ``pages.db``).
        redis_url: Redis for the rate limiter (``REDIS_URL``; unset: in-memory, one process).
        admin_token: a token that bypasses rate limits (``ADMIN_TOKEN``; unset: none).
        worker: ``inprocess`` (default: the indexing worker runs inside the web process),
            ``external`` (run ``hardening worker examples.pages_service.store:IndexWorker``),
            or ``off`` (``WORKER_MODE``).
        trusted_proxies: networks whose ``X-Forwarded-For`` is believed (``TRUSTED_PROXIES``,
            comma separated).
        api_tokens: bearer token to ``(user, tier)`` (``API_TOKENS="tok:alice:pro,..."``).
        save_limit: per-user limit on saves (``SAVE_LIMIT``, default ``30/minute``).
        save_block_for: seconds a user who exceeds it stays blocked (``SAVE_BLOCK_FOR``).
        ip_limit: per-IP limit on every request (``IP_LIMIT``, default ``600/minute``).
        key_prefix: prefix of the rate-limit keys in Redis (``KEY_PREFIX``, default ``pages``).
    """

    database_url: str = "sqlite:///pages.db"
    redis_url: str | None = None
    admin_token: str | None = None
    worker: WorkerMode = "inprocess"
    trusted_proxies: tuple[str, ...] = ()
    api_tokens: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    save_limit: str = "30/minute"
    save_block_for: float = 60.0
    ip_limit: str = "600/minute"
    key_prefix: str = "pages"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from environment variables (see the attributes)."""
        env = os.environ if environ is None else environ
        worker = env.get("WORKER_MODE", "inprocess")
        if worker not in ("inprocess", "external", "off"):
            raise ValueError(f"WORKER_MODE must be inprocess, external or off, not {worker!r}")
        tokens: dict[str, tuple[str, str]] = {}
        for entry in filter(None, (e.strip() for e in env.get("API_TOKENS", "").split(","))):
            token, _, rest = entry.partition(":")
            user, _, tier = rest.partition(":")
            if not token or not user:
                raise ValueError("API_TOKENS entries are token:user[:tier]")
            tokens[token] = (user, tier or "free")
        return cls(
            database_url=env.get("DATABASE_URL") or cls.database_url,
            redis_url=env.get("REDIS_URL") or None,
            admin_token=env.get("ADMIN_TOKEN") or None,
            worker=worker,  # type: ignore[arg-type]
            trusted_proxies=tuple(
                p.strip() for p in env.get("TRUSTED_PROXIES", "").split(",") if p.strip()
            ),
            api_tokens=tokens,
            save_limit=env.get("SAVE_LIMIT") or cls.save_limit,
            save_block_for=float(env.get("SAVE_BLOCK_FOR") or cls.save_block_for),
            ip_limit=env.get("IP_LIMIT") or cls.ip_limit,
            key_prefix=env.get("KEY_PREFIX") or cls.key_prefix,
        )

    def describe(self) -> str:
        """One line saying what the service uses, for the start-up log (no secrets)."""
        database = sa.make_url(self.database_url).render_as_string(hide_password=True)
        limiter = "Redis " + _hide(self.redis_url) if self.redis_url else "in-memory"
        return (
            f"database {database}; rate limiter {limiter} (saves {self.save_limit} per user, "
            f"{self.ip_limit} per IP); queue {QUEUE!r} in the database; worker {self.worker}; "
            f"admin bypass {'on' if self.admin_token else 'off'}; "
            f"{len(self.api_tokens)} API token(s)"
        )


def _hide(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)


def make_engine(database_url: str) -> sa.Engine:
    """An engine with the settings the service needs (SQLite: WAL, a busy timeout)."""
    url = sa.make_url(database_url)
    if url.get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)
    engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @sa.event.listens_for(engine, "connect")
    def _pragmas(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        if url.database not in (None, "", ":memory:"):
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


_SCHEMA_LOCK = 0x7061676573  # "pages": the advisory lock key for schema creation
metadata = sa.MetaData()
page_words = sa.Table(
    "page_words",
    metadata,
    sa.Column("page_id", sa.String(255), primary_key=True),
    sa.Column("word", sa.String(40), primary_key=True),
    sa.Column("hits", sa.Integer, nullable=False),
    sa.Index("page_words_word", "word"),
)
page_index = sa.Table(
    "page_index",
    metadata,
    sa.Column("page_id", sa.String(255), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
)


def check_blocks(blocks: object) -> list[dict[str, Any]]:
    """Validate a full block list (``POST`` and ``PUT`` bodies).

    Raises:
        MalformedBody: not a list of ``{"id": str, "type": str, "content": str}`` objects
            with unique ids, within the size bounds.
    """
    if not isinstance(blocks, list):
        raise MalformedBody("blocks must be a JSON array")
    if len(blocks) > MAX_BLOCKS:
        raise MalformedBody(f"at most {MAX_BLOCKS} blocks")
    seen: set[str] = set()
    for index, block in enumerate(blocks):
        if not isinstance(block, dict) or set(block) != {"id", "type", "content"}:
            raise MalformedBody(f"block {index} must have exactly id, type and content")
        if not all(isinstance(block[key], str) for key in ("id", "type", "content")):
            raise MalformedBody(f"block {index}: id, type and content are strings")
        if not 1 <= len(block["id"]) <= 64 or len(block["content"]) > MAX_CONTENT:
            raise MalformedBody(f"block {index}: id of 1-64 chars, content <= {MAX_CONTENT}")
        if block["id"] in seen:
            raise MalformedBody(f"block {index}: duplicate id {block['id']!r}")
        seen.add(block["id"])
    return blocks


def words_of(blocks: object) -> Counter[str]:
    """The words of every block's text, lower-cased, with their counts."""
    counts: Counter[str] = Counter()
    if isinstance(blocks, list):
        for block in blocks:
            if isinstance(block, dict) and isinstance(block.get("content"), str):
                counts.update(word.lower() for word in _WORD.findall(block["content"]))
    return counts


@dataclass(frozen=True)
class Page:
    """A page as the API returns it."""

    id: str
    version: int
    blocks: list[dict[str, Any]]

    @property
    def etag(self) -> str:
        """The page's entity tag (``"v<version>"``)."""
        return etag_for(self.version)

    def to_json(self) -> dict[str, object]:
        """The JSON body."""
        return {"id": self.id, "version": self.version, "blocks": self.blocks}


class PageStore:
    """Pages, their history, their indexing jobs and the search index, on one database.

    Args:
        engine: the database (SQLite or PostgreSQL).
        metrics: the registry the history and the queue report into.
    """

    def __init__(self, engine: sa.Engine, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.history = DocumentHistory(
            engine,
            snapshots=SnapshotPolicy(every=20),
            conflict="reject",  # a stale If-Match is the client's to rebase (412)
            limits=PatchLimits(
                max_operations=1_000, max_bytes=1_000_000, max_array_length=MAX_BLOCKS
            ),
            metrics=metrics,
        )
        self.jobs = SQLBackend(engine)
        self.indexer = IndexWorker(self.jobs, engine=engine, metrics=metrics)

    def create_schema(self) -> None:
        """Create every table (history, jobs, search index) if missing.

        Several worker processes start at once; on PostgreSQL they take turns under an
        advisory lock, or two ``CREATE TABLE``s of the same name collide.
        """
        postgres = self.engine.dialect.name == "postgresql"
        with self.engine.connect() as lock:
            if postgres:
                lock.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": _SCHEMA_LOCK})
            try:
                self.history.create_schema()
                self.jobs.create_schema()
                metadata.create_all(self.engine)
            finally:
                if postgres:
                    lock.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": _SCHEMA_LOCK})

    def create(self, blocks: object) -> Page:
        """Store a new page at version 1 and enqueue its indexing, in one transaction."""
        checked = check_blocks(blocks)
        page_id = uuid.uuid4().hex[:16]
        with Session(self.engine) as session, session.begin():
            self.history.create(page_id, checked, session=session)
            self._enqueue(page_id, session)
        return Page(page_id, 1, checked)

    def get(self, page_id: str, version: int | None = None) -> Page:
        """The head of a page, or an old version rebuilt from its snapshot and patches.

        Raises:
            NotFoundError: no such page or version.
        """
        loaded = self.history.load(page_id, version)
        return Page(page_id, loaded.version, loaded.content)  # type: ignore[arg-type]

    def patch(self, page_id: str, ops: list[Any], base_version: int) -> Page:
        """Apply a JSON Patch written against ``base_version``; enqueue indexing; commit.

        Raises:
            NotFoundError: no such page (404).
            PreconditionFailed: ``base_version`` is not the current version (412).
            PatchError: the patch is invalid or does not apply (422/409/413).
        """
        with Session(self.engine) as session, session.begin():
            try:
                version = self.history.save(
                    page_id, ops, base_version=base_version, session=session
                )
            except ConflictError as exc:
                raise _stale(base_version, exc.current_version) from exc
            content = self.history.load(page_id, session=session).content
            try:  # the patch applied, but must leave a valid page (else all rolls back)
                blocks = check_blocks(content)
            except MalformedBody as exc:
                raise PatchApplyError(f"the patched page is invalid: {exc.reason}") from None
            self._enqueue(page_id, session)
        return Page(page_id, version, blocks)

    def replace(self, page_id: str, blocks: object, base_version: int) -> Page:
        """Save a whole block list (for clients that cannot diff), stored as a patch.

        The server diffs the current blocks against the new ones with ``diff_blocks`` and
        saves that patch, so the history stays a chain of small patches.
        """
        checked = check_blocks(blocks)
        with Session(self.engine) as session, session.begin():
            current = self.history.load(page_id, session=session)
            if current.version != base_version:
                raise _stale(base_version, current.version)
            ops = diff_blocks(check_blocks(current.content), checked)
            if not ops:
                return Page(page_id, current.version, checked)
            try:
                version = self.history.save(
                    page_id, ops, base_version=base_version, session=session
                )
            except ConflictError as exc:
                raise _stale(base_version, exc.current_version) from exc
            self._enqueue(page_id, session)
        return Page(page_id, version, checked)

    def search(self, query: str, limit: int = 20) -> list[dict[str, object]]:
        """Pages containing every word of ``query``, most hits first."""
        words = sorted({word.lower() for word in _WORD.findall(query)})[:10]
        if not words:
            return []
        hits = sa.func.sum(page_words.c.hits).label("hits")
        statement = (
            sa.select(page_words.c.page_id, hits)
            .where(page_words.c.word.in_(words))
            .group_by(page_words.c.page_id)
            .having(sa.func.count() == len(words))
            .order_by(hits.desc(), page_words.c.page_id)
            .limit(limit)
        )
        with self.engine.connect() as connection:
            rows = connection.execute(statement).all()
        return [{"id": row.page_id, "hits": int(row.hits)} for row in rows]

    def indexed_version(self, page_id: str) -> int | None:
        """The version of the page the search index reflects, if any."""
        with self.engine.connect() as connection:
            return connection.execute(
                sa.select(page_index.c.version).where(page_index.c.page_id == page_id)
            ).scalar_one_or_none()

    def _enqueue(self, page_id: str, session: Session) -> None:
        self.indexer.enqueue({"page_id": page_id}, dedupe_key=f"index:{page_id}", session=session)

    def close(self) -> None:
        """Close the queue's connections (the engine is the caller's)."""
        self.indexer.close()


def _stale(base_version: int, current: int | None) -> PreconditionFailed:
    return PreconditionFailed(
        etag_for(base_version), etag_for(current) if current is not None else None
    )


class IndexWorker(QueueProcessor):
    """Rebuilds a page's search words from its head version.

    Runs in the web process by default (``WORKER_MODE=inprocess``) or alone::

        DATABASE_URL=... hardening worker examples.pages_service.store:IndexWorker \\
            --backend "$DATABASE_URL"

    Jobs are deduplicated per page while waiting, and processing is idempotent (it indexes
    whatever the head is and records that version), so a retried or duplicated job is harmless.

    Args:
        backend: the queue backend (the jobs table in the pages database).
        engine: the pages database; default ``DATABASE_URL``'s.
        **options: ``QueueProcessor`` options.
    """

    queue = QUEUE
    max_attempts = 5
    concurrency = 2
    poll_interval = 0.05
    metrics_interval = 1.0  # queue depth for dashboards, refreshed every second
    lease = 30.0
    heartbeat = 10.0

    def __init__(
        self, backend: Any = None, *, engine: sa.Engine | None = None, **options: Any
    ) -> None:
        if backend is None or engine is None:  # run alone: configured by the environment
            database_url = Settings.from_env().database_url
            backend = database_url if backend is None else backend
            engine = make_engine(database_url) if engine is None else engine
        super().__init__(backend, **options)
        self.engine = engine
        self.history = DocumentHistory(self.engine)

    def process(self, job: Job) -> None:
        """Index the head version of the page named in the job."""
        page_id = job.payload["page_id"]  # type: ignore[index,call-overload]
        if not isinstance(page_id, str):
            raise InvalidPatch("an index job names a page id")
        with Session(self.engine) as session, session.begin():
            try:
                head = self.history.load(page_id, session=session)
            except NotFoundError:
                return  # deleted since: nothing to index
            # claim the newer version first: a slower worker holding an older head must not
            # overwrite a newer index (the upsert's row lock also orders concurrent workers)
            insert = _dialect_insert(self.engine)(page_index).values(
                page_id=page_id, version=head.version
            )
            claim = insert.on_conflict_do_update(
                index_elements=[page_index.c.page_id],
                set_={"version": insert.excluded.version},
                where=page_index.c.version < insert.excluded.version,
            )
            if cast(sa.CursorResult[Any], session.execute(claim)).rowcount == 0:
                return  # this version, or a newer one, is indexed already
            words = words_of(head.content)
            session.execute(sa.delete(page_words).where(page_words.c.page_id == page_id))
            if words:
                session.execute(
                    sa.insert(page_words),
                    [{"page_id": page_id, "word": w, "hits": n} for w, n in words.items()],
                )


def _dialect_insert(engine: sa.Engine) -> Any:
    from sqlalchemy.dialects import postgresql, sqlite

    return postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
