"""A process of the cross-process stampede test: many threads ask one key at once.

Run by ``multiprocessing`` (spawn) from ``test_redis.py``; not collected by pytest.
"""

from __future__ import annotations

import threading
import time
from typing import Any


def stampede(url: str, prefix: str, threads: int, start_at: float) -> None:
    """Wait for the common start time, then ``threads`` threads get_or_set one key."""
    import redis

    from hardening import Cache

    client = redis.Redis.from_url(url)
    cache = Cache(client, key_prefix=prefix, namespace="stampede", lock_timeout=10)

    def load() -> dict[str, Any]:
        client.incr(f"{prefix}:loader-runs")
        time.sleep(0.5)  # a slow query: every other process arrives while it runs
        return {"page": 42}

    results: list[Any] = []

    def call() -> None:
        results.append(cache.get_or_set("page:42", load))

    workers = [threading.Thread(target=call) for _ in range(threads)]
    time.sleep(max(0.0, start_at - time.time()))
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    stats = cache.stats()
    client.rpush(f"{prefix}:results", f"{len(results)}:{results.count({'page': 42})}")
    client.incrby(f"{prefix}:avoided", stats.stampedes_avoided)
    client.close()
