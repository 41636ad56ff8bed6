"""hardening: production-hardening primitives for Python services.

Everything a user needs is importable from here. Primitives whose optional dependencies may be
missing are loaded on first access, so ``import hardening`` works with no extras installed and
touching a feature whose extra is missing raises an ``ImportError`` naming the
``pip install 'hardening[...]'`` that fixes it.
"""

import importlib as _importlib
import importlib.metadata as _metadata

from hardening._clock import Clock, FakeClock, SystemClock
from hardening.errors import (
    BackendUnavailable,
    ConfigurationError,
    ConflictError,
    HardeningError,
    InvalidPatch,
    JobRejected,
    LeaseLost,
    NotFoundError,
    PatchApplyError,
    PatchConflict,
    PatchError,
    PatchLimitExceeded,
    PatchTestFailed,
    PreconditionError,
    PreconditionFailed,
    PreconditionRequired,
    QueueError,
    RateLimitExceeded,
    UnsupportedMediaType,
)

try:
    __version__ = _metadata.version("hardening")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# Public name -> private module that defines it; imported on first attribute access.
_LAZY: dict[str, str] = {}

__all__ = [
    "BackendUnavailable",
    "Clock",
    "ConfigurationError",
    "ConflictError",
    "FakeClock",
    "HardeningError",
    "InvalidPatch",
    "JobRejected",
    "LeaseLost",
    "NotFoundError",
    "PatchApplyError",
    "PatchConflict",
    "PatchError",
    "PatchLimitExceeded",
    "PatchTestFailed",
    "PreconditionError",
    "PreconditionFailed",
    "PreconditionRequired",
    "QueueError",
    "RateLimitExceeded",
    "SystemClock",
    "UnsupportedMediaType",
    "__version__",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hardening' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
