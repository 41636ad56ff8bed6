"""Saves whose cost follows the edit: BlockHistory (a row per block) vs DocumentHistory (the
whole page as one JSON value), on PostgreSQL, for 100- and 10,000-block pages.

Cases, each a fresh save in its own transaction, as the pages service makes them (a patch from
``diff_blocks(..., guards=True)``): a one-field edit of a random block, an insert at the top, a
move of a random block to the top. Storages and sizes are interleaved save by save; each case
runs ``--saves`` times per page; medians and p95 in milliseconds. Both storages' pages are
checked against the expected page (the same edits applied in memory) at the end.

DocumentHistory writes a due snapshot inside the save (every 10 saves by default);
BlockHistory reports it and the benchmark writes it with ``snapshot()`` outside the timed
save, as a queue job would: its cost is measured and printed apart.

Usage: python -m benchmarks.blockstore [--saves 200] [--postgres-url URL]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from hardening import BlockHistory, DocumentHistory, PatchLimits, diff_blocks

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
Block = dict[str, object]
WORDS = [
    "plan",
    "release",
    "draft",
    "review",
    "team",
    "budget",
    "quarter",
    "launch",
    "design",
    "feedback",
    "customer",
]


def make_page(n: int, rng: random.Random) -> list[Block]:
    """Blocks like the load test's: id, type, a sentence or two (~120 bytes each)."""
    return [
        {
            "id": f"blk-{i:06d}",
            "type": ("paragraph", "heading", "list_item")[i % 3],
            "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))),
        }
        for i in range(n)
    ]


def edit(page: list[Block], case: str, rng: random.Random, step: int) -> list[Block]:
    new = copy.copy(page)
    if case == "edit":
        i = rng.randrange(len(new))
        new[i] = {**new[i], "content": f"{new[i]['content']} m{step}"[-200:]}
    elif case == "insert-top":
        new.insert(0, {"id": f"new-{step}", "type": "paragraph", "content": f"m{step}"})
    else:
        new.insert(0, new.pop(rng.randrange(1, len(new))))
    return new


def _schema(url: str) -> tuple[sa.Engine, sa.Engine, str]:
    schema = f"bench_blocks_{uuid.uuid4().hex[:8]}"
    sa_url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    admin = sa.create_engine(sa_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    engine = sa.create_engine(sa_url, connect_args={"options": f"-csearch_path={schema}"})
    return admin, engine, schema


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--saves", type=int, default=200, help="saves per case and page")
    parser.add_argument("--sizes", default="100,10000")
    parser.add_argument("--postgres-url", default=POSTGRES_URL)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    admin, engine, schema = _schema(args.postgres_url)
    limits = PatchLimits(max_array_length=50_000)
    stores: dict[str, Any] = {
        "document": DocumentHistory(engine, limits=limits),
        "blocks": BlockHistory(engine, limits=limits),
    }
    for store in stores.values():
        store.create_schema()
    rng = random.Random(7)
    pages: dict[tuple[str, int, str], list[Block]] = {}
    versions: dict[tuple[str, int, str], int] = {}
    times: dict[tuple[str, int, str], list[float]] = {}
    snapshot_times: list[float] = []
    cases = ("edit", "insert-top", "move-top")
    try:
        for size in sizes:
            base = make_page(size, rng)
            for case in cases:
                for name, store in stores.items():
                    key = (name, size, case)
                    store.create(f"{case}-{size}", base)
                    pages[key], versions[key], times[key] = base, 1, []
        for step in range(args.saves):
            for size in sizes:
                for case in cases:
                    new = edit(pages[("document", size, case)], case, rng, step)
                    patch = diff_blocks(pages[("document", size, case)], new, guards=True)
                    for name, store in stores.items():
                        key = (name, size, case)
                        start = time.perf_counter()
                        if name == "blocks":
                            done = store.apply(f"{case}-{size}", patch, base_version=versions[key])
                            version = done.version
                        else:
                            version = store.save(
                                f"{case}-{size}", patch, base_version=versions[key]
                            )
                        times[key].append(time.perf_counter() - start)
                        if name == "blocks" and done.snapshot_due:  # a queue job's work
                            start = time.perf_counter()
                            store.snapshot(f"{case}-{size}")
                            if size == max(sizes):
                                snapshot_times.append(time.perf_counter() - start)
                        versions[key] = version
                        pages[key] = new
        verified = all(  # each store holds the page the same edits give in memory
            stores[name].load(f"{case}-{size}").content
            == pages[(name, size, case)]
            == pages[("document", size, case)]
            for name in stores
            for size in sizes
            for case in cases
        )
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()

    def ms(values: list[float], q: Callable[[list[float]], float]) -> str:
        return f"{q(values) * 1000:.2f}"

    def p95(values: list[float]) -> float:
        return sorted(values)[int(len(values) * 0.95) - 1]

    print(f"\n{args.saves} saves per case and page; PostgreSQL; verified: {verified}\n")
    print(
        "| case | blocks | DocumentHistory median / p95 ms "
        "| BlockHistory median / p95 ms | speed-up |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for case in cases:
        for size in sizes:
            doc, blk = times[("document", size, case)], times[("blocks", size, case)]
            print(
                f"| {case} | {size:,} | {ms(doc, statistics.median)} / {ms(doc, p95)} "
                f"| {ms(blk, statistics.median)} / {ms(blk, p95)} "
                f"| {statistics.median(doc) / statistics.median(blk):.1f}x |"
            )
    if len(sizes) > 1:
        small, large = min(sizes), max(sizes)
        for case in cases:
            ratio = statistics.median(times[("blocks", large, case)]) / statistics.median(
                times[("blocks", small, case)]
            )
            print(f"BlockHistory {case}: {large:,} blocks / {small:,} blocks = {ratio:.2f}x")
    if snapshot_times:
        print(
            f"BlockHistory.snapshot() of a {max(sizes):,}-block page (off the request path): "
            f"median {statistics.median(snapshot_times) * 1000:.1f} ms over {len(snapshot_times)}"
        )


if __name__ == "__main__":
    main()
