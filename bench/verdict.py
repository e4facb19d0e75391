"""The verdict of one run: the table's rows (each with its raw limit), the targets of
issue 5, how the run was set up, and the results as JSON."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import cpu
import report
from psycopg.conninfo import conninfo_to_dict
from runs import BODY, CONSUME_CONNECTIONS, LIST_SCALE_CONNECTIONS, POST_CONNECTIONS
from tools import LOAD_NICENESS

if TYPE_CHECKING:
    from bench import Context

# The raw limit each scenario is divided by (a scenario's name up to " [").
BASIS = {
    "POST /workflow": "raw insert (pgbench)",
    "GET /workflow/{uuid}": "raw get one (pgbench)",
    "GET /workflow?limit=100": "raw list page (pgbench)",
    "consume [postgres]": "raw dequeue SKIP LOCKED + queue index (pgbench)",
    "consume [rabbitmq]": "raw get+ack (pika)",
}


RATIO_TARGETS = {
    "POST /workflow [postgres]": 0.5,
    "POST /workflow [rabbitmq]": 0.35,
    "consume [postgres]": 0.5,
    "consume [rabbitmq]": 0.5,
}


def rows(ctx: Context) -> list[report.Row]:
    out = []
    for result in ctx.results.values():
        key = result.name if result.name.startswith("consume") else result.name.split(" [")[0]
        basis = ctx.results.get(BASIS.get(key, "")) if result.kind == "http" else None
        out.append(report.Row(result, basis))
    return out


def targets(ctx: Context) -> list[report.Target]:
    r = {row.result.name: row for row in rows(ctx)}
    out = []

    def ratio_target(scenario: str, wanted: float, extra: str = "", ok: bool = True) -> None:
        """Judged on the median ratio of the back-to-back pairs; the single run of the
        table is shown beside it."""
        row = r.get(scenario)
        single = row.ratio if row else None
        ratios = pair_ratios(ctx, scenario)
        ratio = statistics.median(ratios) if ratios else single
        if ratio is None or row is None or row.basis is None:
            out.append(report.Target(scenario, f"≥ {wanted} x raw{extra}", "—", None))
            return
        measured = f"{ratio:.2f} x {row.basis.name}"
        if ratios:
            each = ", ".join(f"{q:.2f}" for q in ratios)
            pairs = f"{len(ratios)} back-to-back pair{'s' if len(ratios) != 1 else ''}"
            measured += f" (median of {pairs}: {each}"
            measured += "" if single is None else f"; the table's single run: {single:.2f}"
            measured += ")"
        out.append(
            report.Target(scenario, f"≥ {wanted} x raw{extra}", measured, ratio >= wanted and ok)
        )

    ratio_target("POST /workflow [postgres]", RATIO_TARGETS["POST /workflow [postgres]"])
    drained = ctx.drain_seconds
    drain_ok = drained is not None and drained <= 2.0
    ratio_target(
        "POST /workflow [rabbitmq]",
        RATIO_TARGETS["POST /workflow [rabbitmq]"],
        ", outbox drained ≤ 2 s",
        drain_ok,
    )
    if out[-1].met is not None:
        out[-1].measured += f"; drained in {'—' if drained is None else f'{drained:.2f} s'}"
    ratio_target("consume [postgres]", RATIO_TARGETS["consume [postgres]"])
    ratio_target("consume [rabbitmq]", RATIO_TARGETS["consume [rabbitmq]"])
    small = r.get(f"list first page @ {ctx.mode.rows_small:,} rows")
    big = r.get(f"list first page @ {ctx.mode.rows_big:,} rows")
    if small and big and small.result.p50_ms and big.result.p50_ms:
        q = big.result.p50_ms / small.result.p50_ms
        measured = f"{big.result.p50_ms:.2f} / {small.result.p50_ms:.2f} ms = {q:.2f} x"
        paired = [b.p50_ms / s.p50_ms for s, b in ctx.list_pairs if s.p50_ms and b.p50_ms]
        if paired:
            # Judged on the pairs, like the ratio targets: each compares runs seconds apart.
            q = statistics.median(paired)
            each = ", ".join(f"{x:.2f}" for x in paired)
            pairs = f"{len(paired)} back-to-back pair{'s' if len(paired) != 1 else ''}"
            measured = f"{q:.2f} x (median of {pairs}: {each}; the table's runs: {measured})"
        out.append(
            report.Target(
                f"list p50 @ {ctx.mode.rows_big:,} vs {ctx.mode.rows_small:,} rows",
                "≤ 1.5 x",
                measured,
                q <= 1.5,
            )
        )
    tails = [
        (row.result.name, row.result.p99_ms / row.result.p50_ms)
        for row in r.values()
        if row.result.kind == "http" and row.result.p50_ms and row.result.p99_ms
    ]
    worst = [f"{name}: {q:.1f}x" for name, q in tails if q > 5]
    out.append(
        report.Target(
            "tail: p99 ≤ 5 x p50, every HTTP scenario",
            "all ≤ 5 x",
            f"{len(tails) - len(worst)}/{len(tails)} met"
            + (f"; over: {', '.join(worst)}" if worst else ""),
            not worst if tails else None,
        )
    )
    growths = {b: max(v["growth"].values(), default=0.0) for b, v in ctx.rss.items()}  # type: ignore[attr-defined]
    out.append(
        report.Target(
            "worker RSS growth, 2 min mixed load after warm-up",
            "≤ 10 %",
            ", ".join(f"{b}: {g:+.1%}" for b, g in growths.items()) or "—",
            all(g <= 0.10 for g in growths.values()) if growths else None,
        )
    )
    return out


def pair_ratios(ctx: Context, scenario: str) -> list[float]:
    return [http.rate / raw.rate for raw, http in ctx.pairs.get(scenario, []) if raw.rate]


def pair_lines(ctx: Context) -> list[str]:
    lines = [
        "| target scenario | pair | first | raw limit | raw/s | service/s | service p50 / p99 ms "
        "| ratio | notes |",
        "|-|-:|-|-|-:|-:|-:|-:|-|",
    ]
    for scenario, pairs in ctx.pairs.items():
        for i, (raw, http) in enumerate(pairs, 1):
            basis = BASIS.get(scenario if scenario.startswith("consume") else "POST /workflow")
            first = "service" if i % 2 == 0 else "raw"
            ratio = "—" if not raw.rate else f"{http.rate / raw.rate:.2f}"
            notes = "; ".join(raw.notes + http.notes)
            lines.append(
                f"| {scenario} | {i} | {first} | {basis} | {raw.rate:,.0f} | {http.rate:,.0f} "
                f"| {report.ms(http.p50_ms)} / {report.ms(http.p99_ms)} | {ratio} | {notes} |"
            )
    return lines


def setup_lines(ctx: Context, elapsed: float) -> list[str]:
    m = ctx.mode
    return [
        f"1-minute load average {' at start, '.join(f'{x:.1f}' for x in ctx.load_average)}"
        " at end (above ~1 before the run, other work shared the machine)",
        *_quiet_line(ctx),
        f"PostgreSQL at {_where(ctx.db.url)}, RabbitMQ at {_where(ctx.rabbitmq_url)}; the "
        f"benchmark's own database {ctx.db.name} (dropped after) and queues bench-{ctx.run_id}-*",
        f"mode {m.name}, {elapsed:.0f} s in all; {ctx.workers} uvicorn "
        f"worker{'s' if ctx.workers != 1 else ''} "
        "(`workflows serve --workers N`: uvloop, httptools, no access log), DB_POOL_SIZE "
        "default (10 per worker), LOG_LEVEL=WARNING",
        "pinned with taskset: every load generator (wrk -t1, pgbench -j1, broker.py) on cpu "
        f"{ctx.load_cpus}, at nice {LOAD_NICENESS} (so that the service sharing its core does "
        "not delay the clocks it reads); "
        + (
            f"the service (uvicorn master and workers) on cpu {ctx.server_cpus}; "
            if ctx.server_cpus
            else "the service unpinned, like "
        )
        + "the PostgreSQL and RabbitMQ servers (not started by the harness; unpinned, they "
        "use every core): the raw runs give the database all the cores, and the HTTP runs "
        "give the service and its database the same",
        f"raw runs {m.raw_seconds:g} s, HTTP runs {m.http_seconds:g} s after {m.warmup:g} s "
        f"of warm-up; POST, GET and list at {POST_CONNECTIONS} connections, consume at "
        f"{CONSUME_CONNECTIONS}; list scale at {LIST_SCALE_CONNECTIONS} for {m.list_seconds:g} s, "
        f"then its first page at both sizes back to back, {m.pair_rounds} times, "
        f"{m.pair_seconds:g} s each, alternating which goes first (the small table in the raw "
        "runs' database, each size with a service of its own); the list target is judged on "
        "the median of those pairs' p50 ratios",
        f"body: bench/body.json ({BODY.stat().st_size} bytes: a nested object, 3 lines, "
        "3 steps); pgbench inserts the same row (json data, text[] steps, UUIDv7 key)",
        f"prefilled with SQL (generate_series): {m.rows_small:,} rows for GET; "
        f"{m.dequeue_prefill:,} for the raw dequeue; {m.consume_prefill:,} more for consume "
        "(their uuids also published to the queue for rabbitmq); VACUUM ANALYZE and CHECKPOINT "
        "before each run",
        f"back-to-back pairs: each ratio target and its raw limit, right after the target's "
        f"own scenario, {m.pair_rounds} times, "
        f"{m.pair_seconds:g} s each (the HTTP run after {m.warmup:g} s of warm-up), "
        "alternating which goes first, the raw runs in a second database of their own "
        "while the service waits idle; a ratio target is judged on the median ratio of its "
        "pairs, the tail target on the table's runs (the pairs' p50/p99 are in their table)",
        "raw p50/p99: pgbench per-transaction log; pika: per operation; the prefetching "
        "consumer reports a rate only",
        "before each consume run, the CPU to make one 700-byte file (2,000 made beside the "
        "exports) is in the run's notes: a consume writes one, and on this host that costs "
        "several times more for minutes after many files were deleted (bench/notes.md)",
        f"mixed: 35 % POST, 30 % GET one, 10 % list, 25 % consume, {POST_CONNECTIONS} "
        f"connections, {m.mixed_seconds:g} s"
        + (
            f" after {m.rss_warmup:g} s of warm-up, RSS of each worker sampled every 5 s"
            if m.rss_warmup
            else ""
        ),
    ]


def _where(url: str) -> str:
    """host:port of a URL or libpq conninfo, nothing else (no credentials)."""
    if "://" in url:
        parsed = urlsplit(url)
        return f"{parsed.hostname}:{parsed.port}"
    params = conninfo_to_dict(url)
    return f"{params.get('host', 'localhost')}:{params.get('port', 5432)}"


def save_json(
    ctx: Context,
    rows_: list[report.Row],
    targets_: list[report.Target],
    info: dict[str, str],
    path: Path,
) -> None:
    data: dict[str, Any] = {
        "rows": [report.as_dict(row) for row in rows_],
        "targets": [t.__dict__ for t in targets_],
        "machine": info,
        "rss": ctx.rss,
        "drain_seconds": ctx.drain_seconds,
        "pairs": {
            name: [
                {
                    "raw": report.as_dict(report.Row(raw, None)),
                    "http": report.as_dict(report.Row(http, None)),
                }
                for raw, http in pairs
            ]
            for name, pairs in ctx.pairs.items()
        },
        "problems": ctx.problems,
    }
    path.write_text(json.dumps(data, indent=1, default=str))


def _quiet_line(ctx: Context) -> list[str]:
    if ctx.quiet is None:
        return []
    waited, samples = ctx.quiet
    busy = ", ".join(f"{x:.2f}" for x in samples)
    quiet = max(samples) < cpu.QUIET_CORES
    return [
        f"waited {waited:.0f} s before the first run for the machine to keep under "
        f"{cpu.QUIET_CORES} cores busy for {len(samples)} s in a row"
        + ("" if quiet else " (it did not: the run started anyway)")
        + f"; cores busy in its last seconds: {busy}"
    ]
