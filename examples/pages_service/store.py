"""The pages service without HTTP: settings, storage, the search index and its worker.

Both example apps (``pages_service`` on ASGI, ``flask_pages`` on WSGI) are thin HTTP layers
over :class:`PageStore`, which uses only the public API of ``hardening``:

- a page is an ordered list of blocks ``{"id", "type", "content"}`` kept by a
  :class:`~hardening.BlockHistory`: a row per block, so a save costs the size of the edit, not
  of the page (head row guarded by the optimistic lock, a patch row per save, snapshots by
  :class:`~hardening.SnapshotPolicy` written by a queue job, any version rebuildable);
- a save applies the client's JSON Patch to the blocks it names, checks only the blocks it
  wrote, and enqueues an indexing job naming the changed blocks **in the same transaction**, so
  a committed save always has its indexing job and a rolled-back one never does;
- :class:`IndexWorker`, a :class:`~hardening.QueueProcessor`, re-indexes just those blocks'
  words in a plain ``block_words`` table (SQLite and PostgreSQL alike) that ``search`` reads,
  and writes the snapshots saves leave due.
"""

from __future__ import annotations

import contextlib
import json
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
    BlockHistory,
    BlockSave,
    ConflictError,
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
MAX_BLOCKS = 20_000  # the seeds ask for pages of 10,000+ blocks
MAX_BODY = 8 * 1024 * 1024  # a new 10,000-block page is 1-3 MB of JSON
MAX_CONTENT = 20_000
_WORD = re.compile(r"\w{2,40}", re.UNICODE)


MIN_ADMIN_TOKEN = 16  # RateLimitMiddleware refuses shorter bypass tokens


class SettingsError(ValueError):
    """An environment variable holds a value the service cannot run with.

    The message names the variable and the fix; ``python -m examples.pages_service`` prints it
    as one line and exits with status 2.
    """


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
        """Read the settings from environment variables (see the attributes).

        Raises:
            SettingsError: a variable's value is unusable (the message names it and the fix).
        """
        env = os.environ if environ is None else environ
        worker = env.get("WORKER_MODE", "inprocess")
        if worker not in ("inprocess", "external", "off"):
            raise SettingsError(f"WORKER_MODE must be inprocess, external or off, not {worker!r}")
        tokens: dict[str, tuple[str, str]] = {}
        for entry in filter(None, (e.strip() for e in env.get("API_TOKENS", "").split(","))):
            token, _, rest = entry.partition(":")
            user, _, tier = rest.partition(":")
            if not token or not user:
                raise SettingsError("API_TOKENS entries are token:user[:tier]")
            tokens[token] = (user, tier or "free")
        admin_token = env.get("ADMIN_TOKEN") or None
        if admin_token is not None and len(admin_token) < MIN_ADMIN_TOKEN:
            raise SettingsError(
                f"ADMIN_TOKEN must be at least {MIN_ADMIN_TOKEN} characters, not "
                f"{len(admin_token)}: set a longer one, e.g. ADMIN_TOKEN=$(python -c "
                "'import secrets; print(secrets.token_urlsafe(32))'), or unset it"
            )
        block_for = env.get("SAVE_BLOCK_FOR") or str(cls.save_block_for)
        try:
            save_block_for = float(block_for)
        except ValueError:
            raise SettingsError(f"SAVE_BLOCK_FOR is seconds, not {block_for!r}") from None
        return cls(
            database_url=env.get("DATABASE_URL") or cls.database_url,
            redis_url=env.get("REDIS_URL") or None,
            admin_token=admin_token,
            worker=worker,  # type: ignore[arg-type]
            trusted_proxies=tuple(
                p.strip() for p in env.get("TRUSTED_PROXIES", "").split(",") if p.strip()
            ),
            api_tokens=tokens,
            save_limit=env.get("SAVE_LIMIT") or cls.save_limit,
            save_block_for=save_block_for,
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


def process_warnings(workers: int, environ: Mapping[str, str]) -> list[str]:
    """What is wrong with serving the app from ``workers`` processes in this environment.

    Each process has its own memory, so without ``REDIS_URL`` each counts the rate limits
    alone, and without ``PROMETHEUS_MULTIPROC_DIR`` ``/metrics`` shows only the process that
    answered the scrape. The commands that start the servers log each warning once.

    Args:
        workers: the web worker processes (uvicorn ``--workers``, gunicorn ``workers``).
        environ: the environment the workers will have.

    Returns:
        One message per problem, each naming the fix; empty for one process.
    """
    if workers <= 1:
        return []
    warnings = []
    if not environ.get("REDIS_URL"):
        warnings.append(
            f"{workers} workers with an in-memory rate limiter: each process counts alone; "
            "set REDIS_URL to share the limits"
        )
    if not environ.get("PROMETHEUS_MULTIPROC_DIR"):
        warnings.append(
            f"{workers} workers without PROMETHEUS_MULTIPROC_DIR: /metrics shows only the "
            "worker that answers each scrape; set PROMETHEUS_MULTIPROC_DIR to an empty "
            "directory of its own"
        )
    return warnings


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
block_words = sa.Table(
    "block_words",
    metadata,
    sa.Column("page_id", sa.String(255), primary_key=True),
    sa.Column("block_id", sa.String(64), primary_key=True),
    sa.Column("word", sa.String(40), primary_key=True),
    sa.Column("hits", sa.Integer, nullable=False),
    sa.Index("block_words_word", "word"),
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
        problem = block_problem(block)
        if problem:
            raise MalformedBody(f"block {index}{problem}")
        if block["id"] in seen:
            raise MalformedBody(f"block {index}: duplicate id {block['id']!r}")
        seen.add(block["id"])
    return blocks


def block_problem(block: object) -> str | None:
    """What is wrong with one block (to follow ``"block <n>"``), or ``None``."""
    if not isinstance(block, dict) or set(block) != {"id", "type", "content"}:
        return " must have exactly id, type and content"
    if not all(isinstance(block[key], str) for key in ("id", "type", "content")):
        return ": id, type and content are strings"
    if not 1 <= len(block["id"]) <= 64 or len(block["content"]) > MAX_CONTENT:
        return f": id of 1-64 chars, content <= {MAX_CONTENT}"
    return None


def window_limit(text: str | None) -> int | None:
    """``?limit=`` of a page read: ``None`` (the whole page) or 1 to 1,000 blocks.

    Raises:
        MalformedBody: not a number in that range (400).
    """
    if text is None:
        return None
    if not text.isascii() or not text.isdigit() or not 1 <= int(text[:5]) <= 1_000:
        raise MalformedBody("limit must be a number of blocks from 1 to 1000")
    return int(text)


def check_saved_block(block: dict[str, object]) -> None:
    """BlockHistory's check of each block a save writes: the patched page stays valid."""
    problem = block_problem(block)
    if problem:
        raise PatchApplyError(f"the patched page is invalid: block {block.get('id')!r}{problem}")


def page_history(engine: sa.Engine | None, metrics: Metrics | None = None) -> BlockHistory:
    """The pages' history: a row per block, patch limits for clients, the block check."""
    return BlockHistory(
        engine,
        snapshots=SnapshotPolicy(every=20),
        conflict="reject",  # a stale If-Match is the client's to rebase (412)
        # a new page is checked against the same limits as a whole-page replace, so a patch may
        # be as large as a request body (a 10,000-block page is 1.4 MB); operations stay few
        limits=PatchLimits(max_operations=1_000, max_bytes=MAX_BODY, max_array_length=MAX_BLOCKS),
        metrics=metrics,
        check_block=check_saved_block,
    )


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
    """A page as the API returns it (a save's answer holds no blocks unless asked for)."""

    id: str
    version: int
    blocks: list[dict[str, Any]] | None

    @property
    def etag(self) -> str:
        """The page's entity tag (``"v<version>"``)."""
        return etag_for(self.version)

    def to_json(self) -> dict[str, object]:
        """The JSON body."""
        body: dict[str, object] = {"id": self.id, "version": self.version}
        if self.blocks is not None:
            body["blocks"] = self.blocks
        return body


class PageStore:
    """Pages, their history, their indexing jobs and the search index, on one database.

    Args:
        engine: the database (SQLite or PostgreSQL).
        metrics: the registry the history and the queue report into.
    """

    def __init__(self, engine: sa.Engine, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.history = page_history(engine, metrics)
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
            self._enqueue(page_id, session, changed=None)
        return Page(page_id, 1, checked)

    def get(self, page_id: str, version: int | None = None) -> Page:
        """The head of a page, or an old version rebuilt from its snapshot and patches.

        Raises:
            NotFoundError: no such page or version.
        """
        loaded = self.history.load(page_id, version)
        return Page(page_id, loaded.version, loaded.content)  # type: ignore[arg-type]

    def patches_since(self, page_id: str, version: int) -> dict[str, object]:
        """The saves since ``version`` (``GET /pages/{id}/patches?since=``), at most 100.

        Raises:
            NotFoundError: no such page, or not all of them are kept (the client reloads).
        """
        patches = self.history.patches_since(page_id, version)
        return {"id": page_id, "version": version + len(patches), "patches": patches}

    def get_json(self, page_id: str) -> tuple[int, str]:
        """The head's version and its JSON body, built from the stored blocks as they are.

        Raises:
            NotFoundError: no such page.
        """
        version, blocks = self.history.load_json(page_id)
        return version, f'{{"id":{json.dumps(page_id)},"version":{version},"blocks":{blocks}}}'

    def window(self, page_id: str, *, limit: int, after: str | None = None) -> dict[str, object]:
        """A window of a page's blocks (``GET /pages/{id}?limit=&after=``) and its version.

        Raises:
            NotFoundError: no such page.
            MalformedBody: ``after`` is not a cursor of ours (400).
        """
        window = self.history.load_blocks(page_id, limit=limit, after=after)
        return {
            "id": page_id,
            "version": window.version,
            "total": window.total,
            "blocks": window.blocks,
            "next_after": window.next_after,
        }

    def patch(
        self, page_id: str, ops: list[Any], base_version: int | None, *, full: bool = False
    ) -> Page:
        """Apply a JSON Patch written against ``base_version``; enqueue indexing; commit.

        Only the blocks the patch names are read, checked and written, so a save costs the
        size of the edit; the page is read whole only for ``full`` (``Prefer:
        return=representation``). ``base_version=None`` (``If-Match: *``) applies the patch
        to the head, whatever its version, atomically.

        Raises:
            NotFoundError: no such page (404).
            PreconditionFailed: ``base_version`` is not the current version (412).
            ConflictError: the save lost a race the database settled (409; retry it).
            PatchError: the patch is invalid, does not apply, or leaves an invalid block
                (422/409/413).
        """
        with Session(self.engine) as session, session.begin():
            try:
                saved = self.history.apply(page_id, ops, base_version=base_version, session=session)
            except ConflictError as exc:
                if base_version is None or exc.current_version is None:
                    raise  # If-Match: *, or a race the database settled: 409, retry it
                raise _stale(base_version, exc.current_version) from exc
            self._after_save(page_id, saved, session)
            loaded = self.history.load(page_id, session=session) if full else None
        return Page(page_id, saved.version, None if loaded is None else loaded.content)  # type: ignore[arg-type]

    def replace(self, page_id: str, blocks: object, base_version: int | None) -> Page:
        """Save a whole block list (for clients that cannot diff), stored as a patch.

        The server diffs the current blocks against the new ones with ``diff_blocks`` and
        saves that patch, so the history stays a chain of small patches.
        ``base_version=None`` (``If-Match: *``) replaces whatever version is current; a save
        landing between the read and the write is then a 409 (retry it).
        """
        checked = check_blocks(blocks)
        with Session(self.engine) as session, session.begin():
            current = self.history.load(page_id, session=session)
            if base_version is not None and current.version != base_version:
                raise _stale(base_version, current.version)
            ops = diff_blocks(check_blocks(current.content), checked, guards=True)
            if not ops:
                return Page(page_id, current.version, checked)
            try:
                saved = self.history.apply(
                    page_id, ops, base_version=current.version, session=session
                )
            except ConflictError as exc:
                if base_version is None or exc.current_version is None:
                    raise  # If-Match: *, or a race the database settled: 409, retry it
                raise _stale(base_version, exc.current_version) from exc
            self._after_save(page_id, saved, session)
        return Page(page_id, saved.version, checked)

    def search(self, query: str, limit: int = 20) -> list[dict[str, object]]:
        """Pages containing every word of ``query``, most hits first."""
        words = sorted({word.lower() for word in _WORD.findall(query)})[:10]
        if not words:
            return []
        w = block_words.c
        hits = sa.func.sum(w.hits).label("hits")
        statement = (
            sa.select(w.page_id, hits)
            .where(w.word.in_(words))
            .group_by(w.page_id)
            .having(sa.func.count(sa.distinct(w.word)) == len(words))
            .order_by(hits.desc(), w.page_id)
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

    def _after_save(self, page_id: str, saved: BlockSave, session: Session) -> None:
        """Queue a save's follow-up work in its transaction: re-index the blocks it changed
        (none for a move), and write the snapshot it left due."""
        touched = sorted(saved.changed | saved.removed)
        if touched:
            self._enqueue(page_id, session, changed=touched)
        if saved.snapshot_due:
            self.indexer.enqueue(
                {"page_id": page_id, "action": "snapshot"},
                dedupe_key=f"snapshot:{page_id}",
                session=session,
            )

    def _enqueue(self, page_id: str, session: Session, *, changed: list[str] | None) -> None:
        """An indexing job: the blocks to re-index (``None``: every block of the page)."""
        if changed is None:
            payload: dict[str, object] = {"page_id": page_id, "action": "reindex"}
        else:
            payload = {"page_id": page_id, "action": "index", "block_ids": changed}
        self.indexer.enqueue(payload, session=session)

    def close(self) -> None:
        """Close the queue's connections (the engine is the caller's)."""
        self.indexer.close()


def _stale(base_version: int, current: int) -> PreconditionFailed:
    """The client's ``If-Match`` named ``base_version``, but the page is at ``current``."""
    return PreconditionFailed(etag_for(base_version), etag_for(current))


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
        self.history = page_history(self.engine)

    def process(self, job: Job) -> None:
        """Re-index the blocks a save changed (or every block of a new page), or write the
        snapshot a save left due."""
        payload = job.payload
        if not isinstance(payload, dict) or not isinstance(payload.get("page_id"), str):
            raise InvalidPatch("an index job names a page id")
        page_id = str(payload["page_id"])
        action = payload.get("action", "reindex")
        if action == "snapshot":
            with contextlib.suppress(NotFoundError):  # deleted since
                self.history.snapshot(page_id)
            return
        listed = payload.get("block_ids") if action == "index" else None
        if listed is not None and (
            not isinstance(listed, list) or not all(isinstance(b, str) for b in listed)
        ):
            raise InvalidPatch("block_ids is a list of block ids")
        block_ids = None if listed is None else [str(b) for b in listed]
        with Session(self.engine) as session, session.begin():
            # the page's index row first: its lock orders the workers indexing one page, so
            # the later one reads (and writes) the later blocks
            insert = _dialect_insert(self.engine)(page_index).values(page_id=page_id, version=0)
            session.execute(
                insert.on_conflict_do_update(
                    index_elements=[page_index.c.page_id],
                    set_={"version": page_index.c.version},
                )
            )
            try:
                if block_ids is None:
                    head = self.history.load(page_id, session=session)
                    version = head.version
                    found = {b["id"]: b for b in cast(list[dict[str, Any]], head.content)}
                else:
                    version, found = self.history.find_blocks(page_id, block_ids, session=session)
            except NotFoundError:
                return  # deleted since: nothing to index
            w = block_words.c
            stale = sa.delete(block_words).where(w.page_id == page_id)
            if block_ids is not None:
                stale = stale.where(w.block_id.in_(block_ids))
            session.execute(stale)
            rows = [
                {"page_id": page_id, "block_id": block_id, "word": word, "hits": hits}
                for block_id, block in found.items()
                for word, hits in words_of([block]).items()
            ]
            if rows:
                session.execute(sa.insert(block_words), rows)
            session.execute(
                sa.update(page_index)
                .where(page_index.c.page_id == page_id, page_index.c.version < version)
                .values(version=version)
            )


def _dialect_insert(engine: sa.Engine) -> Any:
    from sqlalchemy.dialects import postgresql, sqlite

    return postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
