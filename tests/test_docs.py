"""Every ``python`` snippet in ``docs/`` runs (docs are runnable, STYLE habit 9).

A page's snippets run in order in one fresh module, like a doctest session: later snippets may
use what earlier ones defined. The module is registered in ``sys.modules`` while it runs, as
libraries that resolve annotations by module (SQLAlchemy) expect.
"""

from __future__ import annotations

import contextlib
import gc
import re
import sys
import types
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
PAGES = {
    page.stem: snippets
    for page in sorted(DOCS.glob("*.md"))
    if (snippets := FENCE.findall(page.read_text(encoding="utf-8")))
}


def test_docs_have_snippets() -> None:
    """The docs carry runnable examples (so the test below cannot silently run nothing)."""
    assert sum(len(snippets) for snippets in PAGES.values()) >= 5


@pytest.mark.parametrize("page", sorted(PAGES))
def test_doc_page_snippets_run(page: str) -> None:
    """The page's snippets execute without error, in order, in one fresh module."""
    name = f"doc_snippets_{page}"
    module = types.ModuleType(name)
    sys.modules[name] = module
    try:
        for number, code in enumerate(PAGES[page]):
            exec(compile(code, f"<docs/{page}.md snippet {number}>", "exec"), module.__dict__)
    finally:
        del sys.modules[name]
        _release(module.__dict__)


def _release(namespace: dict[str, object]) -> None:
    """Close what a page's snippets opened (engines, backends), then collect garbage here, so a
    leak is reported against this page and not against whichever test runs next."""
    for value in list(namespace.values()):
        for method in ("dispose", "close"):
            try:
                close = getattr(value, method, None)
            except RuntimeError:  # a context-bound proxy (flask.request) outside its context
                break
            if callable(close) and not isinstance(value, type):
                with contextlib.suppress(TypeError):  # needs arguments: not a closer
                    close()
                break
    namespace.clear()
    gc.collect()
