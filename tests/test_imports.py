"""Optional dependencies fail with the pip command that fixes them."""

from __future__ import annotations

import pytest

from hardening._imports import require


def test_missing_extra_names_the_pip_install() -> None:
    """A missing optional package names ``pip install 'hardening[extra]'``."""
    with pytest.raises(ImportError, match=r"pip install 'hardening\[redis\]'"):
        require("no_such_module_xyz", extra="redis", feature="the Redis rate-limit storage")


def test_present_module_is_returned() -> None:
    """A module that is installed is simply imported."""
    assert require("json", extra="x", feature="y").dumps([]) == "[]"
