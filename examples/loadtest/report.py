"""The results of a run, the warning rule for an overloaded generator, and the final table."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from examples.loadtest.metrics import QUEUE_STATES, QueueSample
from examples.loadtest.options import Options
from examples.loadtest.recording import Ack
from examples.loadtest.stats import count_5xx
from examples.loadtest.verify import Verification

MAX_GENERATOR_CPU = 50.0  # % of one core a generator process may use before we warn
MAX_LOOP_LAG_P99 = 20.0  # ms of event-loop lag (p99) a generator process may show
ADVICE = "the generator may have inflated these latencies; use more --processes"


@dataclasses.dataclass
class GeneratorStats:
    """What one generator process did and how busy it was.

    Attributes:
        process: its number (0 ..).
        first_user: its first user's number; it ran users ``first_user .. + users - 1``.
        users: how many users it ran.
        requests: requests it sent.
        acknowledged: saves the service acknowledged to its users.
        load_seconds: wall seconds of its load phase.
        cpu_seconds: CPU seconds it used meanwhile (``time.process_time``).
        cpu_percent: ``cpu_seconds / load_seconds`` as a percentage of one core.
        loop_lag_ms: how late its event loop woke (p50, p99, max; ms).
        save_ms: its users' acknowledged saves as they waited (n, p50, p95, p99, max; ms).
    """

    process: int
    first_user: int
    users: int
    requests: int
    acknowledged: int
    load_seconds: float
    cpu_seconds: float
    cpu_percent: float
    loop_lag_ms: dict[str, float | None]
    save_ms: dict[str, float | int | None]


def generator_warnings(
    generators: Sequence[GeneratorStats],
    *,
    max_cpu: float = MAX_GENERATOR_CPU,
    max_lag_p99: float = MAX_LOOP_LAG_P99,
) -> list[str]:
    """Why the generator's numbers may not be trusted: one reason per overloaded process.

    A process is overloaded when it used more than ``max_cpu`` % of a core or its event loop's
    lag p99 exceeded ``max_lag_p99`` ms (then its own queueing shows up in the latencies).
    """
    reasons = []
    for stats in generators:
        lag = stats.loop_lag_ms.get("p99")
        problems = []
        if stats.cpu_percent > max_cpu:
            problems.append(f"used {stats.cpu_percent:.1f}% of a core")
        if lag is not None and lag > max_lag_p99:
            problems.append(f"event-loop lag p99 {lag:.1f} ms")
        if problems:
            reasons.append(f"generator process {stats.process} " + " and ".join(problems))
    return reasons


def warning_line(reasons: Sequence[str]) -> str | None:
    """The report's WARNING line for :func:`generator_warnings`' reasons (``None``: none)."""
    if not reasons:
        return None
    return f"WARNING: {'; '.join(reasons)}: {ADVICE}"


@dataclasses.dataclass
class Results:
    """Everything one run measured (``--json`` writes it).

    ``generator_cpu`` is the CPU every generator process used together, in cores (1.0 = one
    core busy); ``loop_lag_ms`` summarises every process's lag samples together;
    ``generators`` has each process's own figures.
    """

    options: Options
    setup_seconds: float
    settle_seconds: float | None
    setup_failures: dict[str, int]
    load_seconds: float
    requests: int
    statuses: dict[str, dict[int, int]]
    errors: dict[str, int]
    outcomes: dict[str, int]
    edit_kinds: dict[str, int]
    latency_ms: dict[str, dict[str, float | int | None]]
    client: dict[str, int]
    queue_samples: list[QueueSample]
    scrape_failures: int
    honoured_429: int
    early_429: int
    generator_cpu: float
    loop_lag_ms: dict[str, float | None]
    generators: list[GeneratorStats]
    server_latency_ms: dict[str, dict[str, float | None]]
    verification: Verification
    acks: list[Ack]

    @property
    def acknowledged(self) -> int:
        """Saves the service acknowledged."""
        return self.outcomes.get("acknowledged", 0)

    @property
    def warnings(self) -> list[str]:
        """Why the latencies may be the generator's own (see :func:`generator_warnings`)."""
        return generator_warnings(self.generators)

    def status_total(self) -> Counter[int]:
        """Responses by status over every request of the load phase."""
        total: Counter[int] = Counter()
        for counts in self.statuses.values():
            total.update(counts)
        return total

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        data = dataclasses.asdict(self)
        data["options"].pop("admin_token", None)
        data["acknowledged"] = self.acknowledged
        data["processes"] = len(self.generators)
        data["generator_warnings"] = self.warnings
        data["verification"]["ok"] = self.verification.ok
        data["verification"]["saves_ok"] = self.verification.saves_ok
        data["verification"]["search_ok"] = self.verification.search_ok
        return data


def sparkline(values: Sequence[float], width: int = 60, ascii_only: bool = False) -> str:
    """``values`` as a one-line chart of at most ``width`` characters (bucket maxima)."""
    if not values:
        return ""
    marks = " .:-=+*#%@" if ascii_only else " ▁▂▃▄▅▆▇█"
    step = max(1, math.ceil(len(values) / width))
    points = [max(values[i : i + step]) for i in range(0, len(values), step)]
    top = max(points)
    if top <= 0:
        return marks[0] * len(points)
    return "".join(marks[round(p / top * (len(marks) - 1))] for p in points)


Latency = Mapping[str, float | int | None]


def _cell(value: float | int | None, width: int = 9, spec: str = ".1f") -> str:
    return f"{'-' if value is None else format(value, spec):>{width}}"


def generator_table(results: Results) -> list[str]:
    """The per-process generator lines: users, work, save latency, CPU and event-loop lag."""
    lines = [
        f"{'generator':<12}{'users':>7}{'requests':>10}{'saves':>8}{'save p50':>10}"
        f"{'save p95':>10}{'CPU':>7}{'lag p50':>9}{'lag p99':>9}{'lag max':>9}",
    ]

    def row(
        name: str, users: int, requests: int, saves: int, save: Latency, cpu: float, lag: Latency
    ) -> str:
        return (
            f"  {name:<10}{users:>7}{requests:>10}{saves:>8}{_cell(save['p50'], 10)}"
            f"{_cell(save['p95'], 10)}{cpu:>6.0f}%{_cell(lag['p50'])}{_cell(lag['p99'])}"
            f"{_cell(lag['max'])}"
        )

    for g in results.generators:
        name = f"process {g.process}"
        lines.append(
            row(name, g.users, g.requests, g.acknowledged, g.save_ms, g.cpu_percent, g.loop_lag_ms)
        )
    everyone = results.latency_ms["save (as the user waited)"]
    lines.append(
        row(
            "all",
            sum(g.users for g in results.generators),
            results.requests,
            results.acknowledged,
            everyone,
            results.generator_cpu * 100.0,
            results.loop_lag_ms,
        )
    )
    lines.append(
        "  (ms; CPU: % of one core, the processes' sum on the last line; lag: how late each "
        "process's event loop woke)"
    )
    return lines


def report(results: Results, out: TextIO) -> None:
    """Write the final table."""
    o, v = results.options, results.verification
    statuses = results.status_total()
    load = max(results.load_seconds, 1e-9)

    def write(line: str = "") -> None:
        out.write(line + "\n")

    count = len(results.generators)
    processes = f"{count} generator process{'es' if count != 1 else ''}"
    length = f"{o.duration:g} s" if o.duration is not None else f"{o.edits_per_user} edits/user"
    write(
        f"pages service load test: {o.users} users ({processes}), "
        f"{o.pages} pages x {o.blocks} blocks, "
        f"think {o.think:g} s, shared {o.shared:g} ({o.hot} hot), {length}; {o.url}"
    )
    retried = ", ".join(f"{k}: {n}" for k, n in sorted(results.setup_failures.items()))
    write(
        f"setup {results.setup_seconds:.1f} s"
        + (f" (retried after {retried})" if retried else "")
        + (
            f", indexed in {results.settle_seconds:.1f} s more"
            if results.settle_seconds is not None
            else ""
        )
        + f", load {results.load_seconds:.1f} s"
    )
    write()
    write(f"{'throughput':<34}{'count':>9}{'per s':>10}")
    write(f"{'  requests':<34}{results.requests:>9}{results.requests / load:>10.1f}")
    write(
        f"{'  acknowledged saves':<34}{results.acknowledged:>9}{results.acknowledged / load:>10.1f}"
    )
    write()
    write(f"{'latency (ms)':<34}{'n':>7}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}")
    for name, row in results.latency_ms.items():
        cells = "".join(
            f"{'-' if row[k] is None else format(row[k], '.1f'):>9}"
            for k in ("p50", "p95", "p99", "max")
        )
        write(f"  {name:<32}{row['n']:>7}{cells}")
    for route, row in results.server_latency_ms.items():
        cells = "".join(
            f"{'-' if row[k] is None else format(row[k], '.1f'):>9}" for k in ("p50", "p95", "p99")
        )
        write(f"  {'server ' + route:<32}{row['n'] or 0:>7.0f}{cells}")
    write(
        "  (server rows: the service's own http_server_request_duration_seconds buckets, "
        "interpolated; n counts the requests of the process(es) the scrape reached)"
    )
    write()
    for line in generator_table(results):
        write(line)
    warning = warning_line(results.warnings)
    if warning:
        write(warning)
    write()
    codes = [200, 201, 304, 409, 412, 428, 429]
    line = "  ".join(f"{code}: {statuses[code]}" for code in codes)
    others = sorted(c for c in statuses if c not in codes and c < 500)
    extra = "".join(f"  {c}: {statuses[c]}" for c in others)
    errors = sum(results.errors.values())
    write(f"responses  {line}{extra}  5xx: {count_5xx(statuses)}  no response: {errors}")
    for kind, counts in sorted(results.statuses.items()):
        write(f"  {kind:<16}" + "  ".join(f"{c}: {n}" for c, n in sorted(counts.items())))
    for name, count in sorted(results.errors.items()):
        write(f"  error {name}: {count}")
    write()
    write("saves      " + ", ".join(f"{k}: {n}" for k, n in sorted(results.outcomes.items())))
    write("edits      " + ", ".join(f"{k}: {n}" for k, n in sorted(results.edit_kinds.items())))
    c = results.client
    write(
        f"client     412 rebases: {c.get('retries_412', 0)} ({c.get('caught_up', 0)} from the "
        f"saves since, not the whole page), 429 waits: {c.get('waits_429', 0)} "
        f"(honoured {results.honoured_429}, early {results.early_429}), "
        f"conflicts: {c.get('conflicts', 0)}"
    )
    patch, full = c.get("patch_bytes", 0), c.get("full_bytes", 0)
    ratio = f"{patch / full:.2%}" if full else "-"
    per = f"{patch / max(c.get('saves', 0), 1):.0f}"
    write(f"bytes      patches {patch:,} (avg {per}/save) vs full pages {full:,}: {ratio}")
    write()
    samples = results.queue_samples
    failed = f", {results.scrape_failures} scrapes failed" if results.scrape_failures else ""
    if samples:
        ascii_only = "utf" not in (getattr(out, "encoding", None) or "").lower()
        totals = [s.total for s in samples]
        most = {state: max(getattr(s, state) for s in samples) for state in QUEUE_STATES}
        write(
            "queue      index: max "
            + ", ".join(f"{state} {n:.0f}" for state, n in most.items())
            + f" ({len(samples)} scrapes{failed})"
        )
        write(f"  over time |{sparkline(totals, ascii_only=ascii_only)}| max {max(totals):.0f}")
        picks = sorted({round(i * (len(samples) - 1) / 5) for i in range(6)})
        write("  samples   " + ", ".join(f"{samples[i].at:.0f}s: {totals[i]:.0f}" for i in picks))
    else:
        write("queue      no hardening_queue_depth samples scraped")
    write()
    write("verification")
    if v.saves_ok:
        write(
            f"  (1) no acknowledged save lost: OK ({results.acknowledged} saves, "
            f"{v.markers_checked} markers on {v.pages_checked} pages; versions = 1 + saves)"
        )
    else:
        write(f"  (1) acknowledged saves: FAILED ({len(v.missing_markers)} markers missing)")
        for problem in [*v.missing_markers, *v.problems][:20]:
            write(f"      {problem}")
    if v.search_ok:
        write(f"  (2) search caught up: OK, {v.search_pages} pages in {v.search_seconds:.2f} s")
    else:
        write(f"  (2) search caught up: FAILED, {len(v.search_missing)} pages not found")
        for missing in v.search_missing[:10]:
            write(f"      {missing}")
    if warning:
        write(warning)
    write(f"RESULT: {'PASS' if v.ok else 'FAIL'}")
