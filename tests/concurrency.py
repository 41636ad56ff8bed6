"""Many callers at once, for the pressure tests: threads released together, results kept."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_threads(count: int, work: Callable[[], T], *, timeout: float = 120.0) -> list[T]:
    """Run ``work`` in ``count`` threads released by one barrier; return every result.

    Args:
        count: how many threads (callers at once).
        work: what each one does.
        timeout: how long to wait for them all.

    Returns:
        The results, in no particular order.

    Raises:
        BaseException: the first exception a thread raised (after all have ended).
        AssertionError: a thread was still running after ``timeout``.
    """
    barrier = threading.Barrier(count)
    results: list[T] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run() -> None:
        barrier.wait()
        try:
            result = work()
        except BaseException as exc:
            with lock:
                errors.append(exc)
        else:
            with lock:
                results.append(result)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "threads still running"
    if errors:
        raise errors[0]
    return results
