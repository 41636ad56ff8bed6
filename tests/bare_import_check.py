"""Run in a venv with no extras: ``import hardening`` works and extras are named when missing.

Used by the ``bare`` tox env (``python tests/bare_import_check.py``); not collected by pytest.
"""

from __future__ import annotations

import importlib.util
import sys

import hardening

OPTIONAL = ("redis", "sqlalchemy", "limits", "prometheus_client", "jsonpatch")
present = [name for name in OPTIONAL if importlib.util.find_spec(name) is not None]
if present:
    sys.exit(f"the bare env unexpectedly has {present}")

problems = []
for name in hardening.__all__:
    try:
        getattr(hardening, name)
    except ImportError as exc:
        if "pip install 'hardening[" not in str(exc):
            problems.append(f"{name}: {exc}")
if problems:
    sys.exit("missing extras are not named:\n" + "\n".join(problems))
print(f"bare import ok: hardening {hardening.__version__}, {len(hardening.__all__)} names")
