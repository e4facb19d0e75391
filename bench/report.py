"""The table, the targets, the machine: printed, and written as Markdown with a PNG chart."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cpu
from tools import Result

NOTES = Path(__file__).with_name("notes.md")
"""Hand-written: profile findings and what each optimisation gained, appended to the page."""


@dataclass
class Row:
    result: Result
    basis: Result | None  # the matching raw limit, measured in the same run

    @property
    def ratio(self) -> float | None:
        if self.basis is None or not self.basis.rate:
            return None
        return self.result.rate / self.basis.rate


@dataclass
class Target:
    name: str
    wanted: str
    measured: str
    met: bool | None  # None: not measured in this mode


def ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def table(rows: Sequence[Row]) -> list[str]:
    lines = [
        "| scenario | conc. | requests/s | p50 ms | p99 ms | raw limit (same run) | ratio "
        "| cores busy | CPU µs per op: service / PostgreSQL / RabbitMQ / rest | notes |",
        "|-|-:|-:|-:|-:|-|-:|-:|-:|-|",
    ]
    for row in rows:
        r = row.result
        basis = "—" if row.basis is None else f"{row.basis.name}: {row.basis.rate:,.0f}/s"
        ratio = "—" if row.ratio is None else f"{row.ratio:.2f}"
        used = r.extra.get("cpu")
        busy = "—" if used is None else f"{used['cores busy']:.2f}"
        per_op = "—" if used is None else cpu.per_op(used, r.ok)
        lines.append(
            f"| {r.name} | {r.concurrency} | {r.rate:,.0f} | {ms(r.p50_ms)} | {ms(r.p99_ms)} "
            f"| {basis} | {ratio} | {busy} | {per_op} | {'; '.join(r.notes)} |"
        )
    return lines


def budget_lines(rows: Sequence[Row], wanted: dict[str, float]) -> list[str]:
    """For each ratio target: the rate the whole machine would reach if every core did
    nothing but this scenario's work at the CPU cost per request measured in its run, and
    that rate over the raw limit. A ceiling only at that cost: batching makes a request
    cheaper under more load."""
    cores = os.cpu_count() or 1
    lines = [
        f"| scenario | CPU µs per request, all processes | all {cores} cores at that cost "
        "| ÷ raw limit (same run) | wanted |",
        "|-|-:|-:|-:|-:|",
    ]
    for row in rows:
        r, used = row.result, row.result.extra.get("cpu")
        if r.name not in wanted or used is None or row.basis is None or not r.ok:
            continue
        total = sum(used[g] for g in cpu.ORDER) / r.ok
        ceiling = cores / total if total else 0.0
        lines.append(
            f"| {r.name} | {total * 1e6:,.0f} | {ceiling:,.0f}/s "
            f"| {ceiling / row.basis.rate:.2f} | {wanted[r.name]} |"
        )
    return lines


def target_lines(targets: Sequence[Target]) -> list[str]:
    lines = ["| target | wanted | measured | met |", "|-|-|-|-|"]
    for t in targets:
        met = "not measured" if t.met is None else ("**yes**" if t.met else "**no**")
        lines.append(f"| {t.name} | {t.wanted} | {t.measured} | {met} |")
    return lines


def machine(db_version: str, db_settings: dict[str, str], rabbitmq: str) -> dict[str, str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
    return {
        "date (UTC)": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "cores (nproc)": str(os.cpu_count()),
        "CPU": cpu,
        "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "PostgreSQL": f"{db_version} ({', '.join(f'{k}={v}' for k, v in db_settings.items())})",
        "RabbitMQ": rabbitmq,
        "wrk": _first_line(["wrk", "-v"]),
        "pgbench": _first_line(["pgbench", "--version"]),
        "commit": _first_line(["git", "rev-parse", "--short", "HEAD"])
        + (
            ", workflows/ unmodified"
            if not _first_line(["git", "status", "--porcelain", "--", "workflows"]).strip()
            else ", workflows/ WITH UNCOMMITTED CHANGES"
        ),
    }


def _first_line(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError:
        return ""
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else ""


def markdown(
    rows: Sequence[Row],
    targets: Sequence[Target],
    info: dict[str, str],
    setup: list[str],
    chart: str,
    pairs: Sequence[str] = (),
    budget: Sequence[str] = (),
) -> str:
    parts = [
        "# Benchmarks",
        "",
        "Written by `make bench` (bench/bench.py) from one run; numbers are never edited by "
        "hand. Every ratio divides the service's rate by the raw limit of its own dependency "
        "measured **in the same run** on the same machine: `pgbench` for PostgreSQL, "
        "`bench/broker.py` (pika) for RabbitMQ. Re-run before committing a change to a hot path.",
        "",
        f"![throughput and latency]({chart})",
        "",
        "## Results",
        "",
        *table(rows),
        "",
        "## Targets (issue 5)",
        "",
        *target_lines(targets),
        "",
        *(
            [
                "### Back-to-back pairs",
                "",
                "Each ratio target and its raw limit, run one right after the other (the "
                "ratio targets above take the median of these):",
                "",
                *pairs,
                "",
            ]
            if pairs
            else []
        ),
        *(
            [
                "### CPU budget of the ratio targets",
                "",
                "Each run's CPU time (from /proc: the service's processes, PostgreSQL's, "
                "RabbitMQ's, and the rest of the machine's busy time, mostly the load generator) "
                "per request, and the rate the whole machine would reach if every core did "
                "nothing but that work at that cost. When that ceiling is below a target, the "
                "target needs cheaper requests, not less waiting:",
                "",
                *budget,
                "",
            ]
            if len(budget) > 2
            else []
        ),
        "## How it was run",
        "",
        *[f"- {line}" for line in setup],
        "",
        "## Machine",
        "",
        *[f"- {key}: {value}" for key, value in info.items()],
        "",
        NOTES.read_text().strip() if NOTES.exists() else "",
        "",
    ]
    return "\n".join(parts)


def chart(rows: Sequence[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    http = [row for row in rows if row.result.kind == "http"]
    names = [row.result.name for row in http]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.42 * len(http) + 1.8), sharey=True)
    y = range(len(http))
    ratios = [row.ratio or 0.0 for row in http]
    colours = ["#4c72b0" if row.ratio is not None else "#bbbbbb" for row in http]
    left.barh(list(y), ratios, color=colours)
    for i, row in enumerate(http):
        label = f"{row.result.rate:,.0f}/s" + (f"  ({row.ratio:.2f}x)" if row.ratio else "")
        left.text((row.ratio or 0) + 0.01, i, label, va="center", fontsize=8)
    left.axvline(0.5, color="#c44e52", linestyle="--", linewidth=1)
    left.axvline(0.35, color="#dd8452", linestyle=":", linewidth=1)
    left.set_xlabel("service rate ÷ raw limit of the dependency, same run (targets 0.5, 0.35)")
    left.set_xlim(0, max([0.6, *ratios]) * 1.35)
    left.set_yticks(list(y), names, fontsize=8)
    left.invert_yaxis()
    p50 = [row.result.p50_ms or 0 for row in http]
    p99 = [row.result.p99_ms or 0 for row in http]
    right.barh([i - 0.2 for i in y], p50, height=0.4, label="p50", color="#55a868")
    right.barh([i + 0.2 for i in y], p99, height=0.4, label="p99", color="#8172b2")
    right.set_xscale("log")
    right.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    right.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    right.xaxis.set_minor_formatter(ticker.NullFormatter())
    right.set_xlabel("latency, ms (log scale)")
    right.legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def as_dict(row: Row) -> dict[str, Any]:
    r = row.result
    return {
        "scenario": r.name,
        "kind": r.kind,
        "concurrency": r.concurrency,
        "rate": round(r.rate, 1),
        "p50_ms": r.p50_ms,
        "p99_ms": r.p99_ms,
        "ok": r.ok,
        "failures": r.failures,
        "seconds": r.seconds,
        "basis": None if row.basis is None else row.basis.name,
        "ratio": None if row.ratio is None else round(row.ratio, 3),
        "notes": r.notes,
        "extra": r.extra,
    }
