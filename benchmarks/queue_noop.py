"""The no-op job every queue benchmark runs, and its completion count.

rq imports the function by name (``benchmarks.queue_noop.noop``); every system's handler calls
:func:`noop`, so that the benchmark can check that each of the N jobs ran (at least once).
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_handled = [0]


def noop(*args: object, **kwargs: object) -> None:
    """Count one call, and nothing else."""
    with _lock:
        _handled[0] += 1


def handled() -> int:
    """How many calls :func:`noop` has counted in this process."""
    return _handled[0]
