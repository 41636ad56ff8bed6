"""Job queue: a processor base class with leases, retries, dead letters and cleanup.

``QueueProcessor`` (``processor.py``) drives a backend behind ``backends.base.QueueBackend``:
``MemoryBackend`` (embedded), ``SQLBackend`` (PostgreSQL, SQLite) and ``RedisBackend``.
"""

from hardening.queue.backends.base import QueueBackend, RecoveringBackend
from hardening.queue.backends.memory import MemoryBackend
from hardening.queue.job import Attempt, Job, JobError, JobState, QueueStats
from hardening.queue.processor import QueueOptions, QueueProcessor, backend_from_url

__all__ = [
    "Attempt",
    "Job",
    "JobError",
    "JobState",
    "MemoryBackend",
    "QueueBackend",
    "QueueOptions",
    "QueueProcessor",
    "QueueStats",
    "RecoveringBackend",
    "backend_from_url",
]
