"""Behaviour under pressure, measured: recovery after a blip and the longest Redis step.

Not a peer comparison: the figures the failure-behaviour issue asks for, measured on real
Redis through the test suite's fault-injecting proxy (``tests/faultproxy.py``):
- blip recovery: 50 threads hit a ``RateLimiter`` in a loop; the proxy cuts Redis for 0.2 s;
  how long after the restore the last error decision was made (the breaker's window is 0.5 s);
- pool pressure: 400 concurrent ``AsyncRateLimiter.hit`` at 20/minute (admitted, errors);
- ``Cache.set_many`` of 100,000 values: the longest command Redis ran for it (``SLOWLOG``);
- 100,000 delayed queue jobs falling due at once: the longest claim (``SLOWLOG``).

It changes ``slowlog-log-slower-than`` and ``slowlog-max-len`` for the run and restores them,
and deletes only its own keys.

Usage: python -m benchmarks.faults [--redis redis://127.0.0.1:6379/0] [--blips 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import redis
from tests.faultproxy import FaultProxy, blip_under_load

from hardening import AsyncRateLimiter, Cache, FakeClock, RateLimiter
from hardening.queue.backends.redis import RedisBackend
from hardening.queue.job import new_job_id


def blip_recovery(url: str, prefix: str) -> tuple[float, int, int]:
    """Seconds from the restore to the last error decision; errors; decisions."""
    parts = urlsplit(url)
    proxy = FaultProxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    limiter = RateLimiter("1000000/minute", storage=proxy.redis_url(), key_prefix=prefix)
    try:
        report = blip_under_load(proxy, lambda: limiter.hit("busy").error)
    finally:
        limiter.close()
        proxy.close()
    return report.recovered_after, report.failed, report.calls


async def crowd(url: str, prefix: str) -> tuple[int, int]:
    """400 concurrent hits at 20/minute: (admitted, error decisions)."""
    async with AsyncRateLimiter("20/minute", storage=url, key_prefix=prefix) as limiter:
        decisions = await asyncio.gather(*(limiter.hit("crowd") for _ in range(400)))
    return sum(d.allowed for d in decisions), sum(d.error for d in decisions)


@contextmanager
def slowlog(client: redis.Redis) -> Iterator[Callable[[bytes], list[float]]]:
    """Record every command over 0.1 ms; yields a reader of the EVALSHA durations (ms)."""
    threshold = client.config_get("slowlog-log-slower-than")["slowlog-log-slower-than"]
    length = client.config_get("slowlog-max-len")["slowlog-max-len"]
    client.config_set("slowlog-log-slower-than", 100)
    client.config_set("slowlog-max-len", 20_000)
    client.slowlog_reset()

    def read(marker: bytes) -> list[float]:
        return [
            entry["duration"] / 1000
            for entry in client.slowlog_get(20_000)
            if bytes(entry["command"]).startswith(b"EVALSHA") and marker in bytes(entry["command"])
        ]

    try:
        yield read
    finally:
        client.config_set("slowlog-log-slower-than", threshold)
        client.config_set("slowlog-max-len", length)


def cleanup(client: redis.Redis, prefix: str) -> None:
    """Delete the keys under ``prefix`` (ours only)."""
    for key in client.scan_iter(match=f"{prefix}*", count=5000):
        client.delete(key)


def set_many(client: redis.Redis, url: str, prefix: str) -> tuple[int, float, float]:
    """``Cache.set_many`` of 100,000 values: (steps, longest ms, whole call s)."""
    cache = Cache(url, key_prefix=prefix)
    with slowlog(client) as read:
        started = time.perf_counter()
        cache.set_many({f"item:{i}": {"i": i} for i in range(100_000)}, tags=["bulk"])
        took = time.perf_counter() - started
        steps = read(prefix.encode())
    assert cache.get("item:99999") == {"i": 99999}
    cache.close()
    return len(steps), max(steps), took


def queue_claims(client: redis.Redis, prefix: str) -> tuple[int, int, float, float]:
    """100,000 due jobs: (claimed, claims, longest ms, median ms)."""
    clock = FakeClock()
    backend = RedisBackend(client, clock=clock, key_prefix=prefix)
    queue, now = "bulk", clock.time()
    keys, job_prefix, enqueue = (
        backend.queue_keys(queue),
        backend._job_prefix(queue),
        backend._scripts["enqueue"],
    )
    pipe = client.pipeline(transaction=False)
    for n in range(100_000):
        args: list[Any] = [job_prefix, repr(now), new_job_id(), queue, "{}", "0", repr(now + 60)]
        enqueue(keys=keys, args=[*args, repr(now), "3", "0", ""], client=pipe)
        if n % 5_000 == 4_999:
            pipe.execute()
    pipe.execute()
    clock.advance(61)
    claimed = claims = 0
    with slowlog(client) as read:
        while jobs := backend.claim(queue, worker="w", limit=500, lease=3600):
            claimed += len(jobs)
            claims += 1
        durations = read(prefix.encode())
    return claimed, claims, max(durations), statistics.median(durations)


def main() -> None:
    """Print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--blips", type=int, default=5)
    options = parser.parse_args()
    client = redis.Redis.from_url(options.redis)
    prefix = f"hardening-bench-faults:{uuid.uuid4().hex[:8]}"
    try:
        recoveries = []
        for n in range(options.blips):
            seconds, errors, decisions = blip_recovery(options.redis, f"{prefix}:blip{n}")
            recoveries.append(seconds)
            print(
                f"blip {n}: last error {seconds * 1000:.0f} ms after the restore "
                f"({errors} of {decisions} decisions made without Redis)"
            )
        print(
            f"blip recovery: median {statistics.median(recoveries) * 1000:.0f} ms, "
            f"max {max(recoveries) * 1000:.0f} ms (50 callers, 0.2 s cut, 0.5 s window)"
        )
        admitted, errors = asyncio.run(crowd(options.redis, f"{prefix}:crowd"))
        print(f"400 concurrent hits at 20/minute: {admitted} admitted, {errors} error decisions")
        steps, longest, took = set_many(client, options.redis, f"{prefix}:cache")
        print(
            f"Cache.set_many(100,000): {steps} steps, longest {longest:.1f} ms, "
            f"whole call {took:.2f} s"
        )
        claimed, claims, longest, median = queue_claims(client, f"{prefix}:queue")
        print(
            f"100,000 due jobs: {claimed} claimed in {claims} claims, longest {longest:.1f} ms, "
            f"median {median:.1f} ms"
        )
    finally:
        cleanup(client, prefix)
        client.close()


if __name__ == "__main__":
    main()
