"""Optional dependencies, imported lazily with an error that says which extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, *, extra: str, feature: str) -> ModuleType:
    """Import an optional dependency, or explain how to install it.

    Args:
        module: the module to import, e.g. ``"redis.asyncio"``.
        extra: the `hardening` extra that provides it, e.g. ``"redis"``.
        feature: what the user was doing, for the message.

    Returns:
        The imported module.

    Raises:
        ImportError: naming the exact ``pip install 'hardening[extra]'`` that fixes it.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{feature} needs the {module.split('.')[0]!r} package, which is not installed: "
            f"pip install 'hardening[{extra}]'",
            name=exc.name,
        ) from exc
