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


# --- queue ---------------------------------------------------------------------------------


def test_queue_commands_on_sqlite(tmp_path: Any) -> None:
    """init, stats, dead, requeue, purge and cleanup operate a real SQLite queue."""
    from hardening.queue.backends.sql import SQLBackend
    from tests.queue.cli_app import Echo

    url = f"sqlite:///{tmp_path}/q.db"
    assert _run("queue", "init", "--backend", url) == (0, "ready: SQLBackend\n")
    backend = SQLBackend(url)
    proc = Echo(backend, max_attempts=1)
    proc.enqueue({"fail": True})
    proc.enqueue({"fail": True})
    proc.run_until_empty()
    status, text = _run("queue", "stats", "--backend", url, "--queue", "cli")
    assert status == 0
    assert [line.split() for line in text.splitlines() if line.startswith("dead")] == [
        ["dead", "2"]
    ]
    status, text = _run("queue", "dead", "--backend", url, "--queue", "cli")
    assert "ValueError: asked to fail" in text
    dead_id = text.split()[0]
    assert _run("queue", "requeue", "--backend", url, "--queue", "cli", "--id", dead_id)[1] == (
        "requeued 1 job(s)\n"
    )
    assert _run("queue", "purge", "--backend", url, "--queue", "cli")[1] == "purged 1 job(s)\n"
    assert (
        _run("queue", "cleanup", "--backend", url, "--queue", "cli", "--older-than", "0")[1]
        == "deleted 0 finished job(s)\n"
    )
    backend.close()


def test_worker_command_processes_and_stops_gracefully(tmp_path: Any) -> None:
    """``hardening worker`` processes jobs and exits 0 on SIGTERM."""
    import os
    import signal
    import time
    from pathlib import Path

    from hardening.queue.backends.sql import SQLBackend
    from tests.queue.cli_app import Echo

    url = f"sqlite:///{tmp_path}/w.db"
    backend = SQLBackend(url)
    backend.create_schema()
    for n in range(5):
        Echo(backend).enqueue({"n": n})
    log = tmp_path / "echo.log"
    root = Path(__file__).resolve().parent.parent
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hardening.cli",
            "worker",
            "tests.queue.cli_app:Echo",
            "--backend",
            url,
            "--concurrency",
            "2",
        ],
        cwd=root,
        env={**os.environ, "ECHO_LOG": str(log)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and backend.stats("cli").completed < 5:
            time.sleep(0.05)
        assert backend.stats("cli").completed == 5
    finally:
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=30)
    assert worker.returncode == 0
    assert "worker stopped" in output
    assert sorted(log.read_text().splitlines()) == [f"{{'n': {n}}}" for n in range(5)]
    backend.close()


def test_worker_serves_its_metrics(tmp_path: Any) -> None:
    """``hardening worker --metrics-port``: the worker's own jobs and queue depth on /metrics."""
    import os
    import signal
    import time
    import urllib.request
    from pathlib import Path

    from hardening.queue.backends.sql import SQLBackend
    from tests.queue.cli_app import Echo

    url = f"sqlite:///{tmp_path}/m.db"
    backend = SQLBackend(url)
    backend.create_schema()
    for n in range(3):
        Echo(backend).enqueue({"n": n})
    root = Path(__file__).resolve().parent.parent
    worker = subprocess.Popen(
        [
            sys.executable, "-m", "hardening.cli", "worker", "tests.queue.cli_app:Echo",
            "--backend", url, "--metrics-port", "0", "--metrics-host", "127.0.0.1",
        ],
        cwd=root,
        env={**os.environ, "ECHO_LOG": str(tmp_path / "echo.log")},
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert worker.stdout is not None
        first = worker.stdout.readline()
        assert "metrics on http://127.0.0.1:" in first, first
        address = first.rsplit(" ", 1)[1].strip()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and backend.stats("cli").completed < 3:
            time.sleep(0.05)
        with urllib.request.urlopen(address, timeout=10) as response:
            body = response.read().decode()
            assert response.headers["Content-Type"].startswith("text/plain")
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(address.replace("/metrics", "/other"), timeout=10)
        assert missing.value.code == 404
        missing.value.close()
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=30)
    assert worker.returncode == 0
    assert 'hardening_jobs_total{outcome="completed",queue="cli"} 3.0' in body
    backend.close()


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
def test_a_missing_table_is_one_line_naming_the_fix(
    engine: str, request: pytest.FixtureRequest, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A queue whose table was never created: one line saying to run 'hardening queue init'."""
    if engine == "sqlite":
        url = f"sqlite:///{tmp_path}/empty.db"
    else:
        schema = request.getfixturevalue("pg_schema")
        base = request.getfixturevalue("postgres_url")
        url = f"{base}?options=-csearch_path%3D{schema}"
    assert main(["queue", "stats", "--backend", url, "--queue", "q"]) == 1
    assert capsys.readouterr().err == (
        "error: the queue's table does not exist: run 'hardening queue init'\n"
    )


def test_an_unreachable_database_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """PostgreSQL refusing connections: one line, exit 1 (it used to be a 50-line traceback)."""
    from tests.conftest import free_port

    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test?connect_timeout=2"
    assert main(["queue", "stats", "--backend", url, "--queue", "q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: sql backend unavailable")
    assert len(err.splitlines()) == 1


# --- history ---------------------------------------------------------------------------------


def _history_url(engine: str, request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if engine == "sqlite":
        return f"sqlite:///{tmp_path}/history.db"
    schema = request.getfixturevalue("pg_schema")
    return f"{request.getfixturevalue('postgres_url')}?options=-csearch_path%3D{schema}"


def _two_documents(url: str, storage: str) -> None:
    """Documents "a" and "b" at version 3; b's patch row of version 2 altered."""
    import sqlalchemy as sa

    from hardening import BlockHistory, DocumentHistory

    engine = sa.create_engine(url)
    history = BlockHistory(engine) if storage == "block" else DocumentHistory(engine)
    history.create_schema()
    for doc_id in ("a", "b"):
        history.create(doc_id, [{"id": "x", "text": ""}])
        for version in (1, 2):
            patch = [{"op": "replace", "path": "/0/text", "value": f"v{version}"}]
            history.save(doc_id, patch, base_version=version)
    prefix = "hardening_block" if storage == "block" else "hardening_document"
    altered = '[{"op":"replace","path":"/0/text","value":"forged"}]'
    cast = "CAST(:p AS json)" if storage == "document" and engine.dialect.name != "sqlite" else ":p"
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"UPDATE {prefix}_patches SET patch = {cast} "
                "WHERE document_id = 'b' AND version = 2"
            ),
            {"p": altered},
        )
    engine.dispose()


@pytest.mark.parametrize("storage", ["document", "block"])
@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
def test_history_verify_reports_damage_and_exits_1(
    engine: str, storage: str, request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    """``history verify --all`` prints one line per damaged document and a summary, exit 1;
    sound documents alone exit 0."""
    url = _history_url(engine, request, tmp_path)
    _two_documents(url, storage)
    options = ["history", "verify", "--database", url, "--storage", storage]
    assert _run(*options, "--all") == (
        1,
        "corrupt b version 2: its patch row does not match its chain digest\n"
        "checked 2 document(s): 1 corrupt or missing, 0 unchained row(s) "
        "(saved before the checksums)\n",
    )
    status, text = _run(*options, "a")
    assert (status, text.splitlines()[-1][:45]) == (
        0,
        "checked 1 document(s): 0 corrupt or missing, ",
    )
    status, text = _run(*options, "a", "nope")
    assert status == 1
    assert text.splitlines()[0] == "missing nope: no such document"


def test_history_verify_usage_and_missing_tables(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Documents named or --all (exactly one: else status 2); tables that are not there: one
    line, status 1."""
    url = f"sqlite:///{tmp_path}/empty.db"
    assert main(["history", "verify", "--database", url]) == 2
    assert main(["history", "verify", "--database", url, "--all", "a"]) == 2
    assert capsys.readouterr().err.count("DOC_ID") == 2
    assert main(["history", "verify", "--database", url, "a"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the history tables do not exist")
    assert len(err.splitlines()) == 1
    assert main(["history", "verify", "--database", "not a url", "--all"]) == 2
