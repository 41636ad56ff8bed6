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


def outcome_within(
    call: Callable[[], T], seconds: float, *, release: Callable[[], object] | None = None
) -> T | BaseException:
    """Run ``call`` in a thread that must end within ``seconds``; return what it returned or
    the exception it raised.

    Args:
        call: what to run (e.g. a call to a store that went silent).
        seconds: how long it may take.
        release: called once the wait is over, whatever happened (e.g. restore the proxy,
            which frees a call still waiting, so the thread always ends).

    Returns:
        The call's result, or the exception it raised (not re-raised).

    Raises:
        AssertionError: the call was still running after ``seconds``.
    """
    outcome: list[T | BaseException] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(seconds)
    overran = thread.is_alive()
    if release is not None:
        release()
    if overran:
        thread.join(10)
    assert not overran, f"still running after {seconds:g} s"
    return outcome[0]
