"""Every ``python`` snippet in ``docs/`` runs (docs are runnable, STYLE habit 9)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _snippets() -> list[pytest.ParameterSet]:
    cases = []
    for page in sorted(DOCS.glob("*.md")):
        for number, match in enumerate(FENCE.finditer(page.read_text(encoding="utf-8"))):
            cases.append(pytest.param(match.group(1), id=f"{page.stem}-{number}"))
    return cases


def test_docs_have_snippets() -> None:
    """The docs carry runnable examples (so the test below cannot silently run nothing)."""
    assert len(_snippets()) >= 3


@pytest.mark.parametrize("code", _snippets())
def test_doc_snippet_runs(code: str) -> None:
    """The snippet executes without error in a fresh namespace."""
    exec(compile(code, "<doc snippet>", "exec"), {"__name__": "__doc_snippet__"})
