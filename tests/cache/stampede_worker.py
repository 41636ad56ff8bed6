"""A process of the cross-process stampede test: many threads ask one key at once.

Run by ``multiprocessing`` (spawn) from ``test_redis.py``; not collected by pytest.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any


def stampede(url: str, prefix: str, threads: int, start_at: float, total: int) -> None:
    """Wait for the common start time, then ``threads`` threads get_or_set one key.

    The loader does not return before all ``total`` callers (of every process) have missed:
    fixed work, so the count of avoided loads is exact however slow the machine. Each process
    publishes its miss count to Redis while its threads run.
    """
    import redis

    from hardening import Cache

    client = redis.Redis.from_url(url)
    cache = Cache(client, key_prefix=prefix, namespace="stampede", lock_timeout=60)
    misses = f"{prefix}:misses"
    me = str(os.getpid())

    def load() -> dict[str, Any]:
        client.incr(f"{prefix}:loader-runs")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # a slow query: every caller arrives while it runs
            if sum(int(n) for n in client.hvals(misses)) >= total:
                break
            time.sleep(0.005)
        return {"page": 42}

    results: list[Any] = []
    finished = threading.Event()

    def call() -> None:
        results.append(cache.get_or_set("page:42", load))

    def publish() -> None:
        while not finished.wait(0.005):
            client.hset(misses, me, cache.stats().misses)
        client.hset(misses, me, cache.stats().misses)

    workers = [threading.Thread(target=call) for _ in range(threads)]
    publisher = threading.Thread(target=publish)
    time.sleep(max(0.0, start_at - time.time()))
    publisher.start()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    finished.set()
    publisher.join()
    stats = cache.stats()
    client.rpush(f"{prefix}:results", f"{len(results)}:{results.count({'page': 42})}")
    client.incrby(f"{prefix}:avoided", stats.stampedes_avoided)
    client.close()
