"""Documented usage that ``mypy --strict`` checks (run by the ``type`` tox env)."""

from __future__ import annotations

from datetime import timedelta

import hardening
from hardening import ConflictError, FakeClock, HardeningError, RateLimitExceeded

clock: hardening.Clock = FakeClock()
now: float = clock.time()
FakeClock().advance(timedelta(seconds=1))

try:
    raise ConflictError("Page", 1, expected_version=1, current_version=2)
except ConflictError as exc:
    expected: int | None = exc.expected_version
    status: int = exc.http_status
except RateLimitExceeded as exc:
    wait: float = exc.retry_after
except HardeningError as exc:
    data: dict[str, object] = exc.details()

version: str = hardening.__version__
