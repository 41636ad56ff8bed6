"""A queue processor's options, its retry policy, and backends from URLs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hardening._backoff import Backoff
from hardening._clock import Clock, to_seconds
from hardening.errors import ConfigurationError
from hardening.queue.job import Job

if TYPE_CHECKING:
    from hardening.queue.backends.base import QueueBackend

__all__ = ["QueueOptions", "backend_from_url", "next_run_at"]

_DURATIONS = ("lease", "heartbeat", "retention", "poll_interval", "shutdown_grace")
_OPTIONS = frozenset(
    {
        "queue",
        "max_attempts",
        "max_lost",
        "backoff",
        "concurrency",
        "rate_limit",
        "max_payload_bytes",
        "metrics_interval",
        "timeout",
        "transactional",
        *_DURATIONS,
    }
)


def next_run_at(job: Job, now: float, backoff: Backoff) -> float | None:
    """The retry policy: when a failed job runs next, or ``None`` when it is dead.

    Args:
        job: the job whose attempt just failed (``attempts`` counts that attempt).
        now: the current time.
        backoff: the delay policy.

    Returns:
        The time of the next attempt, or ``None`` once the job's own failures reach
        ``max_attempts`` (attempts lost with a crashed worker count apart, against
        ``max_lost``).
    """
    if job.failures >= job.max_attempts:
        return None
    return now + backoff.delay(job.failures)


def backend_from_url(url: str, *, clock: Clock | None = None) -> QueueBackend:
    """Build a backend from a URL.

    Args:
        url: ``memory://``, any SQLAlchemy URL (``sqlite:///jobs.db``,
            ``postgresql+psycopg://…``), or a Redis URL (``redis://``, ``rediss://``,
            ``redis+cluster://``, ``redis+sentinel://``).
        clock: the clock for leases and delays.

    Returns:
        The backend; backends built from a URL own their connections (``close()``).

    Raises:
        ConfigurationError: an unknown scheme.
    """
    from hardening._redis import client_from_url, is_redis_url

    if url == "memory://":
        from hardening.queue.backends.memory import MemoryBackend

        return MemoryBackend(clock=clock)
    if is_redis_url(url):
        from hardening.queue.backends.redis import RedisBackend

        return RedisBackend(client_from_url(url), clock=clock, owns_client=True)
    scheme = url.split(":", 1)[0]
    if scheme.startswith(("sqlite", "postgresql", "postgres", "mysql", "mariadb")):
        from hardening.queue.backends.sql import SQLBackend

        return SQLBackend(url, clock=clock)
    raise ConfigurationError(f"unsupported queue backend URL {url!r}")


@dataclass(frozen=True, slots=True)
class QueueOptions:
    """A processor's options, resolved from class attributes and keyword arguments.

    Durations are seconds; see :class:`~hardening.queue.QueueProcessor` for each one's meaning.
    """

    queue: str
    max_attempts: int
    backoff: Backoff
    lease: float
    heartbeat: float
    concurrency: int
    rate_limit: str | None
    retention: float
    poll_interval: float
    shutdown_grace: float
    max_payload_bytes: int
    metrics_interval: float
    timeout: float | None = None
    transactional: bool = False
    max_lost: int = 3

    @classmethod
    def resolve(cls, defaults: type, options: Mapping[str, Any]) -> QueueOptions:
        """The options of a processor class, keyword arguments overriding class attributes.

        Args:
            defaults: the processor class (its attributes are the defaults).
            options: the keyword arguments given.

        Returns:
            The validated options.

        Raises:
            ConfigurationError: an unknown or invalid option.
        """
        unknown = set(options) - _OPTIONS
        if unknown:
            raise ConfigurationError(f"unknown queue options: {sorted(unknown)}")
        settings = {name: options.get(name, getattr(defaults, name)) for name in _OPTIONS}
        durations = {name: to_seconds(settings[name], name=name) for name in _DURATIONS}
        timeout = settings["timeout"]
        if timeout is not None:
            timeout = to_seconds(timeout, name="timeout", allow_zero=False)
        resolved = cls(
            queue=_text(settings["queue"], "queue"),
            max_attempts=_positive_int(settings["max_attempts"], "max_attempts"),
            backoff=Backoff.of(settings["backoff"]),
            concurrency=_positive_int(settings["concurrency"], "concurrency"),
            rate_limit=settings["rate_limit"],
            max_payload_bytes=_positive_int(settings["max_payload_bytes"], "max_payload_bytes"),
            metrics_interval=to_seconds(settings["metrics_interval"], name="metrics_interval"),
            timeout=None
            if timeout is None
            else to_seconds(timeout, name="timeout", allow_zero=False),
            transactional=bool(settings["transactional"]),
            max_lost=_positive_int(settings["max_lost"], "max_lost"),
            poll_interval=max(durations.pop("poll_interval"), 0.001),
            **durations,
        )
        if not 0 < resolved.heartbeat < resolved.lease:
            raise ConfigurationError("heartbeat must be positive and shorter than lease")
        return resolved


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a positive integer, not {value!r}")
    return value


def _text(value: object, name: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 100:
        raise ConfigurationError(f"{name} must be a non-empty string of at most 100 characters")
    return value
