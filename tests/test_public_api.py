"""The public API is exactly ``hardening.__all__``: sorted, complete, and every name importable."""

from __future__ import annotations

import ast
import importlib
import inspect
import types
from pathlib import Path

import pytest

import hardening

SRC = Path(hardening.__file__).parent


def test_all_is_sorted() -> None:
    """``__all__`` is kept sorted so additions are easy to review."""
    assert list(hardening.__all__) == sorted(hardening.__all__)


def test_all_has_no_duplicates() -> None:
    """Each public name is listed once."""
    assert len(set(hardening.__all__)) == len(hardening.__all__)


def test_every_public_name_resolves() -> None:
    """Every name in ``__all__`` (lazy or eager) can be imported from ``hardening``."""
    for name in hardening.__all__:
        assert getattr(hardening, name) is not None, name


def test_no_public_name_missing_from_all() -> None:
    """Every public (non-underscore) name bound in ``hardening`` is listed in ``__all__``.

    Modules (``errors``, ``adapters``...) are namespaces, not API names, and are excluded.
    """
    public = {
        name
        for name in dir(hardening)
        if not name.startswith("_") and not isinstance(getattr(hardening, name), types.ModuleType)
    }
    assert public == set(hardening.__all__) - {"__version__"}


def test_lazy_names_are_in_all_and_exist() -> None:
    """Each lazily loaded name is public and defined by the module it points to."""
    for name, module in hardening._LAZY.items():
        assert name in hardening.__all__
        assert hasattr(importlib.import_module(module), name)


def test_every_exported_error_is_a_hardening_error() -> None:
    """Everything in ``hardening.errors.__all__`` derives from ``HardeningError``."""
    from hardening import errors

    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.HardeningError)
        assert name in hardening.__all__


def test_public_names_have_docstrings() -> None:
    """Every public class or function exported by ``hardening`` has a docstring."""
    for name in hardening.__all__:
        obj = getattr(hardening, name)
        # not type aliases (a generic alias counts as a class on 3.10) or constants
        is_alias = isinstance(obj, types.GenericAlias)
        if (inspect.isclass(obj) and not is_alias) or inspect.isfunction(obj):
            assert (obj.__doc__ or "").strip(), name


def test_version_is_a_string() -> None:
    """``__version__`` comes from the installed distribution's metadata."""
    assert isinstance(hardening.__version__, str)
    assert hardening.__version__[0].isdigit()


def test_unknown_attribute_raises_attribute_error() -> None:
    """A typo gives a normal ``AttributeError`` rather than a confusing import error."""
    with pytest.raises(AttributeError, match="NoSuchThing"):
        hardening.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018


def test_no_assert_used_for_validation_in_src() -> None:
    """The library never validates with ``assert`` (it vanishes under ``python -O``)."""
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        asserts = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert)]
        assert not asserts, f"{path.name}: assert at lines {asserts}"
