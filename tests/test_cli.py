"""The ``hardening`` command line."""

from __future__ import annotations

import io
import subprocess
import sys
from typing import Any

import pytest

from hardening.cli import main
from hardening.ratelimit import RateLimiter


def _run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


def test_ratelimit_show_reads_redis(redis_client: Any, redis_prefix: str) -> None:
    """``ratelimit show`` prints remaining quota and blocking state from the shared store."""
    prefix = redis_prefix.rstrip(":")
    limiter = RateLimiter("5/minute", storage=redis_client, key_prefix=prefix)
    for _ in range(3):
        limiter.hit("user:42")
    url = "redis://{host}:{port}/{db}".format(**redis_client.connection_pool.connection_kwargs)
    status, text = _run(
        "ratelimit", "show", "user:42", "--limit", "5/minute", "--storage", url, "--prefix", prefix
    )
    assert status == 0
    assert "2 of 5 left" in text
    assert [line.split()[-1] for line in text.splitlines() if line.startswith("blocked")] == ["no"]


def test_ratelimit_reset_forgets_key(redis_client: Any, redis_prefix: str) -> None:
    """``ratelimit reset`` clears a key's counters in the shared store."""
    prefix = redis_prefix.rstrip(":")
    limiter = RateLimiter("1/minute", storage=redis_client, key_prefix=prefix)
    limiter.hit("user:7")
    assert not limiter.peek("user:7").allowed
    url = "redis://{host}:{port}/{db}".format(**redis_client.connection_pool.connection_kwargs)
    status, text = _run(
        "ratelimit", "reset", "user:7", "--limit", "1/minute", "--storage", url, "--prefix", prefix
    )
    assert (status, text.strip()) == (0, "reset user:7")
    assert limiter.peek("user:7").allowed


def test_unreachable_storage_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    """A dead storage is an error message and status 1, not a traceback."""
    status, _ = _run(
        "ratelimit", "show", "k", "--limit", "1/second", "--storage", "redis://127.0.0.1:1/0"
    )
    assert status == 1
    assert "did not answer" in capsys.readouterr().err


def test_bad_limit_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed limit is reported clearly."""
    status, _ = _run("ratelimit", "show", "k", "--limit", "lots")
    assert status == 1
    assert "cannot parse rate limit" in capsys.readouterr().err


def test_console_script_runs() -> None:
    """The installed ``hardening`` entry point answers ``--help``."""
    result = subprocess.run(
        [sys.executable, "-m", "hardening.cli", "ratelimit", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0
    assert "show" in result.stdout
