"""Queue throughput: N no-op jobs through ours and through arq, rq, saq, dramatiq, celery and
procrastinate, on the same Redis and PostgreSQL, in one run.

Each system runs in a process of its own: ours with this interpreter, each peer in its own venv
(``benchmarks/envs.py``) so that none changes the project's redis-py. Each one enqueues N jobs one
call at a time, as its users' code does, then starts one worker process (16 concurrent jobs, a
10 ms poll where the system has such knobs) and is timed until the N-th job has run. A figure
counts only when it is verified: the handler ran for each of the N jobs (a job run twice is
reported as a duplicate run) and the system's own record agrees
(ours: ``stats().completed == N``; the peers': ``benchmarks/queue_peers.py``).

Systems are interleaved over ``--runs`` rounds; the table shows each one's median. Ours also
drains backlogs of other sizes (``--backlogs``) to show the rate does not fall as the queue grows.

Usage::

    python -m benchmarks.jobqueue [--n 20000] [--runs 3] [--only ours,arq,...]
        [--backlogs 5000,100000] [--redis-url URL] [--postgres-url URL]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.envs import peer_python, run_json

REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
CONCURRENCY = 16
POLL = 0.01

# Targets from issue #16: ours on Redis >= 3,000 jobs/s and >= 1.5x the fastest Redis peer;
# ours on PostgreSQL >= 1,500 jobs/s and >= 5x procrastinate; flat from 5k to 100k backlog.
REDIS_TARGET = (3_000, 1.5)
POSTGRES_TARGET = (1_500, 5.0)


@dataclass(frozen=True)
class System:
    """One contender: ours on a backend, or a peer with the requirements of its venv."""

    name: str
    backend: str
    requirements: tuple[str, ...] = ()

    @property
    def ours(self) -> bool:
        return self.name == "ours"

    @property
    def label(self) -> str:
        return f"{self.name} ({self.backend})"


SYSTEMS = (
    System("ours", "redis"),
    System("ours", "postgres"),
    System("arq", "redis", ("arq", "hiredis")),
    System("rq", "redis", ("rq", "hiredis")),
    System("saq", "redis", ("saq[redis]", "hiredis", "typing-extensions")),  # 0.26 forgets it
    System("dramatiq", "redis", ("dramatiq[redis]", "hiredis")),
    System("celery", "redis", ("celery[redis]", "hiredis")),
    System("procrastinate", "postgres", ("procrastinate", "psycopg[binary]")),
)


# --- ours, run in a child process (--run) ----------------------------------------------------


def run_ours(backend_name: str, n: int, redis_url: str, postgres_url: str) -> dict[str, Any]:
    """Enqueue and drain ``n`` no-op jobs through a ``QueueProcessor``; the JSON result."""
    import sqlalchemy as sa

    from benchmarks.queue_noop import handled, noop
    from hardening import Job, QueueProcessor
    from hardening.queue.options import backend_from_url

    name = f"bench-ours-{uuid.uuid4().hex[:8]}"

    class Noop(QueueProcessor):
        queue = name
        poll_interval = POLL

        def process(self, job: Job) -> None:
            noop(job.payload)

    admin = None
    if backend_name == "postgres":
        schema = name.replace("-", "_")
        admin = sa.create_engine(_sqlalchemy_url(postgres_url), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
        url = f"{_sqlalchemy_url(postgres_url)}?options=-csearch_path%3D{schema}"
    else:
        url = redis_url
    backend = backend_from_url(url)
    try:
        if backend_name == "postgres":
            backend.create_schema()  # type: ignore[attr-defined]
        proc = Noop(backend, concurrency=CONCURRENCY)
        start = time.perf_counter()
        for i in range(n):
            proc.enqueue({"i": i})
        enqueued = time.perf_counter() - start
        start = time.perf_counter()
        proc.run_until_empty()
        processed = time.perf_counter() - start
        stats = proc.stats()
        completed = stats.completed
        if not stats.finished_exact:  # past 10,000 PostgreSQL estimates: count them all
            with backend.engine.connect() as conn:  # type: ignore[attr-defined]
                completed = conn.execute(
                    sa.text(
                        f"SELECT count(*) FROM {schema}.hardening_jobs WHERE state = 'completed'"
                    )
                ).scalar_one()
        record = {
            "completed": completed,
            "left": stats.waiting + stats.running + stats.retrying + stats.delayed,
            "dead": stats.dead,
        }
        verified = handled() >= n and record == {"completed": n, "left": 0, "dead": 0}
        from importlib.metadata import version

        return {
            "system": "ours",
            "version": version("hardening"),
            "n": n,
            "enqueue_s": enqueued,
            "process_s": processed,
            "handled": handled(),
            "record": record,
            "verified": verified,
        }
    finally:
        if backend_name == "redis":
            client = backend.client  # type: ignore[attr-defined]
            keys = list(client.scan_iter(match=f"*{name}*", count=5000))
            for at in range(0, len(keys), 5000):
                client.delete(*keys[at : at + 5000])
        backend.close()
        if admin is not None:
            with admin.connect() as conn:
                conn.execute(sa.text(f"DROP SCHEMA {name.replace('-', '_')} CASCADE"))
            admin.dispose()


def _sqlalchemy_url(dsn: str) -> str:
    """``postgresql://…`` as SQLAlchemy's psycopg 3 URL."""
    scheme, rest = dsn.split("://", 1)
    return f"postgresql+psycopg://{rest}" if scheme in ("postgresql", "postgres") else dsn


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Results:
    """Every verified figure of a run, by system and backlog."""

    rates: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    enqueue: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)

    def median(self, label: str, n: int) -> float | None:
        rates = self.rates.get((label, n))
        return statistics.median(rates) if rates else None


def measure(system: System, n: int, args: argparse.Namespace, results: Results) -> None:
    """One run of ``system`` at backlog ``n``; record it if verified, else say why not."""
    urls = ["--redis-url", args.redis_url, "--postgres-url", args.postgres_url]
    if system.ours:
        python: Path | str = sys.executable
        argv = ["-m", "benchmarks.jobqueue", "--run", system.backend, "--n", str(n), *urls]
    else:
        python = peer_python(system.name, list(system.requirements))
        argv = ["benchmarks/queue_peers.py", system.name, "--n", str(n), *urls]
    try:
        result = run_json(python, argv)
    except Exception as exc:  # a peer that fails is reported, not fatal
        print(f"  {system.label:<24} n={n:<7} failed: {exc}", flush=True)
        return
    rate = n / result["process_s"]
    status = "ok" if result["verified"] else f"NOT VERIFIED {result['record']}"
    if result["handled"] > n:
        status += f", {result['handled'] - n} duplicate runs"
        results.duplicates[system.label] = results.duplicates.get(system.label, 0) + (
            result["handled"] - n
        )
    print(
        f"  {system.label:<24} n={n:<7} enqueue {n / result['enqueue_s']:8,.0f}/s"
        f"  process {rate:8,.0f}/s  handled {result['handled']}  {status}",
        flush=True,
    )
    if result["verified"]:
        results.rates.setdefault((system.label, n), []).append(rate)
        results.enqueue.setdefault((system.label, n), []).append(n / result["enqueue_s"])
        results.versions[system.label] = result["version"]


def report(results: Results, systems: list[System], args: argparse.Namespace) -> None:
    """The Markdown tables: all systems at ``--n``, ours across backlogs, the targets."""
    n = args.n
    print(
        "\n| system | version | backend | enqueue jobs/s "
        f"| process jobs/s (median of {args.runs}) | duplicate runs |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for system in systems:
        rate = results.median(system.label, n)
        if rate is None:
            print(f"| {system.name} | | {system.backend} | | failed or not verified | |")
            continue
        enqueue = statistics.median(results.enqueue[(system.label, n)])
        version = results.versions[system.label]
        dupes = results.duplicates.get(system.label, 0)
        print(
            f"| {system.name} | {version} | {system.backend} | {enqueue:,.0f} | {rate:,.0f} "
            f"| {dupes} |"
        )
    backlogs = sorted({n, *args.backlogs})
    ours = [s for s in systems if s.ours]
    if ours and len(backlogs) > 1:
        print("\n| ours, process jobs/s | " + " | ".join(f"{b:,} backlog" for b in backlogs) + " |")
        print("| --- |" + " ---: |" * len(backlogs))
        for system in ours:
            cells = [results.median(system.label, b) for b in backlogs]
            row = " | ".join("—" if c is None else f"{c:,.0f}" for c in cells)
            print(f"| {system.backend} | {row} |")
    print()
    for backend, (floor, ratio), peers in (
        ("redis", REDIS_TARGET, [s for s in systems if not s.ours and s.backend == "redis"]),
        ("postgres", POSTGRES_TARGET, [s for s in systems if s.name == "procrastinate"]),
    ):
        mine = results.median(f"ours ({backend})", n)
        rated = [(results.median(p.label, n), p.label) for p in peers]
        best = max(((r, label) for r, label in rated if r is not None), default=None)
        if mine is None or best is None:
            continue
        print(
            f"ours ({backend}) {mine:,.0f} jobs/s (target >= {floor:,}); "
            f"{mine / best[0]:.2f}x the fastest peer, {best[1]} (target >= {ratio}x)"
        )
        low, high = results.median(f"ours ({backend})", backlogs[0]), None
        high = results.median(f"ours ({backend})", backlogs[-1])
        if low and high and backlogs[0] != backlogs[-1]:
            print(
                f"ours ({backend}) at {backlogs[-1]:,} backlog / at {backlogs[0]:,}: "
                f"{high / low:.2f}"
            )


def main() -> None:
    """Run the comparison, or (``--run``) one of ours in this process."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="jobs per run (all systems)")
    parser.add_argument("--runs", type=int, default=3, help="interleaved rounds")
    parser.add_argument(
        "--backlogs",
        default="5000,100000",
        type=lambda text: [int(part) for part in text.split(",") if part],
        help="other backlog sizes ours drains (comma-separated; '' for none)",
    )
    parser.add_argument("--only", default="", help="comma-separated system names")
    parser.add_argument("--redis-url", default=REDIS_URL)
    parser.add_argument("--postgres-url", default=POSTGRES_URL, help="a libpq URL")
    parser.add_argument("--run", choices=("redis", "postgres"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_ours(args.run, args.n, args.redis_url, args.postgres_url)))
        return
    wanted = {part.strip() for part in args.only.split(",") if part.strip()}
    systems = [s for s in SYSTEMS if not wanted or s.name in wanted or s.label in wanted]
    results = Results()
    for round_ in range(args.runs):
        print(f"round {round_ + 1} of {args.runs}", flush=True)
        for system in systems:
            measure(system, args.n, args, results)
        for backlog in args.backlogs:
            if backlog != args.n:
                for system in (s for s in systems if s.ours):
                    measure(system, backlog, args, results)
    report(results, systems, args)


if __name__ == "__main__":
    main()
