"""tox's in-tree plugin: let tox find every pyenv-installed Python 3.10-3.13.

pyenv's ``python3.10`` ... ``python3.13`` shims answer only for the active version, so on a
pyenv machine tox would skip the other interpreters although they are installed. Before tox
looks for interpreters, this appends each installed 3.10-3.13's own ``bin`` directory to
``PATH`` (after everything already there, so an active or system Python still wins). Nothing
changes on a machine without pyenv.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from tox.plugin import impl

_VERSION = re.compile(r"3\.1[0-3]\.\d+")


def _pyenv_bins() -> list[str]:
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    versions = root / "versions"
    if not versions.is_dir():
        return []
    found = [p / "bin" for p in versions.iterdir() if _VERSION.fullmatch(p.name)]
    return [str(path) for path in sorted(found) if path.is_dir()]


@impl
def tox_add_core_config(core_conf: Any, state: Any) -> None:
    """Put pyenv's interpreters on ``PATH`` before any environment looks for its Python."""
    path = os.environ.get("PATH", "").split(os.pathsep)
    extra = [directory for directory in _pyenv_bins() if directory not in path]
    if extra:
        os.environ["PATH"] = os.pathsep.join([*path, *extra])
