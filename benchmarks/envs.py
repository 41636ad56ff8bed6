"""Peers in their own virtual environments, so that none changes the project's dependencies.

arq pins ``redis<6``, celery's kombu and dramatiq pin their own ranges: installed beside
``hardening`` they would downgrade the redis-py that our side is measured with. Each peer gets a
venv of its own (same Python version as the caller) under ``$HARDENING_BENCH_ENVS`` or
``~/.cache/hardening-bench``, built once and reused while its requirements are unchanged. A peer
script runs there as a subprocess and answers with one JSON line on stdout.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def envs_dir() -> Path:
    """Where the peers' venvs live (``$HARDENING_BENCH_ENVS`` or ``~/.cache/hardening-bench``)."""
    configured = os.environ.get("HARDENING_BENCH_ENVS")
    return Path(configured) if configured else Path.home() / ".cache" / "hardening-bench"


def peer_python(name: str, requirements: list[str]) -> Path:
    """The Python of ``name``'s own venv, created and filled with ``requirements`` if needed."""
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    digest = hashlib.sha256("\n".join(sorted(requirements)).encode()).hexdigest()[:10]
    home = envs_dir() / f"{name}-{version}-{digest}"
    python = home / "bin" / "python"
    ready = home / ".ready"
    if not ready.exists():
        print(f"  building {name}'s venv in {home} ({', '.join(requirements)})", file=sys.stderr)
        venv.EnvBuilder(with_pip=True, clear=True).create(home)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                *requirements,
            ],
            check=True,
        )
        ready.write_text("\n".join(requirements) + "\n")
    return python


def run_json(python: Path | str, argv: list[str], *, timeout: float = 1800) -> dict[str, Any]:
    """Run ``python argv`` from the repository root; the last stdout line, parsed as JSON."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = str(ROOT)  # the benchmarks package (never `hardening` itself)
    done = subprocess.run(
        [str(python), *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise RuntimeError(f"exit {done.returncode}: {tail}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result
