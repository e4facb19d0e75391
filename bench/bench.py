"""`make bench` / `make bench-smoke`: the service beside the raw limits of its dependencies.

One run: a fresh database; the raw limits of PostgreSQL (pgbench) and RabbitMQ (broker.py);
the service started as deployed, once per queue backend, under wrk; the list page at two
table sizes; a worker's RSS over a long mixed load (full mode). It prints one table and
writes it, with the targets of issue 5, the machine and a chart, to docs/benchmarks.md
(full mode) or var/bench/smoke/ (smoke mode). It never asserts a timing: it fails only
when the harness breaks (a run with no successful operation, or any failed one).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cpu
import db as dbmod
import phases
import raw
import report
import verdict
from tools import Result

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mode:
    name: str
    raw_seconds: float
    http_seconds: float
    warmup: float
    mixed_seconds: float  # with RSS sampling in full mode
    rss_warmup: float  # 0: no RSS measurement
    list_seconds: float
    rows_small: int
    rows_big: int
    dequeue_prefill: int
    consume_prefill: int
    broker_depth: int  # messages on the raw queue before each get/consume run
    pair_rounds: int  # back-to-back rounds of each ratio target and its raw limit
    pair_seconds: float


FULL = Mode("full", 15, 20, 3, 120, 20, 10, 10_000, 1_000_000, 150_000, 60_000, 100_000, 3, 10)
SMOKE = Mode("smoke", 1, 1, 0, 1, 0, 1, 1_000, 10_000, 10_000, 3_000, 5_000, 1, 1)


@dataclass
class Context:
    mode: Mode
    db: dbmod.Database
    raw_db: dbmod.Database  # the raw runs of the back-to-back pairs, beside the service's
    rabbitmq_url: str
    run_id: str
    workers: int
    server_cpus: str | None
    load_cpus: str | None
    out: Path
    results: dict[str, Result] = field(default_factory=dict)
    pairs: dict[str, list[tuple[Result, Result]]] = field(default_factory=dict)
    """Per ratio target: (raw, http) measured back to back, `pair_rounds` times."""
    list_pairs: list[tuple[Result, Result]] = field(default_factory=list)
    """The list's first page at the small and the big table, back to back."""
    problems: list[str] = field(default_factory=list)
    rss: dict[str, dict[str, object]] = field(default_factory=dict)
    drain_seconds: float | None = None
    load_average: list[float] = field(default_factory=list)  # 1-minute, at start and end
    quiet: tuple[float, list[float]] | None = None  # cpu.wait_until_quiet before the run

    def add(self, result: Result) -> Result:
        self.results[result.name] = result
        return self.check(result)

    def check(self, result: Result) -> Result:
        """Count a run's problems and print it (`add` also puts it in the table)."""
        if result.ok == 0:
            self.problems.append(f"{result.name}: no successful operation")
        if result.failures:
            self.problems.append(f"{result.name}: {result.failures} failed operations")
        used = result.extra.get("cpu")
        budget = "" if used is None else f"  cores {used['cores busy']:.2f}  µs/op "
        budget += "" if used is None else cpu.per_op(used, result.ok)
        print(
            f"  {result.name:<48} {result.rate:>9,.0f}/s  p50 {_ms(result.p50_ms)} ms"
            f"  p99 {_ms(result.p99_ms)} ms{budget}  {'; '.join(result.notes)}",
            flush=True,
        )
        return result


def _ms(value: float | None) -> str:
    return "      —" if value is None else f"{value:7.2f}"


def cpus() -> tuple[str | None, str | None]:
    """(server cores, load generator cores). The load generators get the last core. On
    3+ cores the service gets the others; on 2 it is left unpinned, like PostgreSQL and
    RabbitMQ: the raw runs give the database both cores, so the service and its database
    get both too (pinned to one core, the service would be measured against a database
    that had twice its CPU). BENCH_SERVER_CPUS / BENCH_LOAD_CPUS override ('' =
    unpinned)."""
    n = os.cpu_count() or 1
    server = f"0-{n - 2}" if n > 2 else None
    load = str(n - 1) if n >= 2 else None
    server = os.environ.get("BENCH_SERVER_CPUS", server or "") or None
    load = os.environ.get("BENCH_LOAD_CPUS", load or "") or None
    if shutil.which("taskset") is None:
        return None, None
    return server, load


def distinct_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        if (port := free_port()) not in ports:
            ports.append(port)
    return ports


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="seconds-long: prove the harness")
    # One worker: `workflows serve` and the image's default. On 2 cores, measured back to back,
    # one worker beat two on every path (bench/notes.md): PostgreSQL needs the other core.
    parser.add_argument("--workers", type=int, default=int(os.environ.get("BENCH_WORKERS", "1")))
    parser.add_argument("--keep-db", action="store_true", help="do not drop the database")
    args = parser.parse_args(argv)
    mode = SMOKE if args.smoke else FULL
    run_id = time.strftime("%Y%m%d%H%M%S") + f"_{os.getpid()}"
    server_url = os.environ.get("BENCH_DATABASE_URL") or os.environ.get(
        "DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    out = ROOT / "var" / "bench" / ("smoke" if args.smoke else run_id)
    out.mkdir(parents=True, exist_ok=True)
    server_cpus, load_cpus = cpus()
    ctx = Context(
        mode=mode,
        db=dbmod.Database(server_url, f"bench_{run_id}"),
        raw_db=dbmod.Database(server_url, f"bench_{run_id}_raw"),
        rabbitmq_url=os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"),
        run_id=run_id,
        workers=args.workers,
        server_cpus=server_cpus,
        load_cpus=load_cpus,
        out=out,
    )
    started = time.monotonic()
    ctx.load_average.append(os.getloadavg()[0])
    if ctx.load_average[0] > 1.0:
        print(
            f"bench: warning: 1-minute load average {ctx.load_average[0]:.1f} before the run:"
            " something else is using the machine and the numbers will show it"
        )
    # The smoke run only proves the wait works: one sample, whatever it reads.
    ctx.quiet = (
        cpu.wait_until_quiet(limit=120.0)
        if mode is FULL
        else cpu.wait_until_quiet(seconds=1, limit=0.0)
    )
    waited, samples = ctx.quiet
    if max(samples) >= cpu.QUIET_CORES and mode is FULL:
        print(
            f"bench: warning: the machine kept {max(samples):.2f} cores busy after {waited:.0f} s"
            " of waiting: something else is using it and the numbers will show it"
        )
    print(f"bench ({mode.name}): service on cpus {server_cpus}, load generators on {load_cpus},")
    print(f"  {args.workers} workers, database {ctx.db.name}, output {out}", flush=True)
    try:
        workflows = str(ROOT / ".venv" / "bin" / "workflows")
        for database in (ctx.db, ctx.raw_db):
            database.create()
            env = {**os.environ, "DATABASE_URL": database.url}
            subprocess.run([workflows, "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
        pg_started = ctx.db.started_at()
        info = report.machine(ctx.db.version(), ctx.db.settings(), raw.rabbitmq_version(ctx))
        raw.raw_postgres(ctx)
        raw.raw_broker(ctx)
        for backend in ("postgres", "rabbitmq"):
            phases.http(ctx, backend, free_port())
        phases.list_scale(ctx, *distinct_ports(2))
        if ctx.db.started_at() != pg_started:
            ctx.problems.append("PostgreSQL restarted during the run: its numbers are not valid")
    except Exception as error:  # the harness broke: say where, and fail
        ctx.problems.append(f"harness error: {error!r}")
        raise
    finally:
        if not args.keep_db:
            ctx.db.drop()
            ctx.raw_db.drop()
        shutil.rmtree(out / "exports", ignore_errors=True)
    elapsed = time.monotonic() - started
    ctx.load_average.append(os.getloadavg()[0])
    write(ctx, info, elapsed)
    if ctx.problems:
        print("\nbench: the harness found problems:", *ctx.problems, sep="\n  ", file=sys.stderr)
        return 1
    print(f"\nbench ({mode.name}) finished in {elapsed:.0f} s")
    return 0


def write(ctx: Context, info: dict[str, str], elapsed: float) -> None:
    rows = verdict.rows(ctx)
    targets = verdict.targets(ctx)
    setup = verdict.setup_lines(ctx, elapsed)
    pairs = verdict.pair_lines(ctx) if ctx.pairs else []
    print("\n" + "\n".join(report.table(rows)) + "\n\n" + "\n".join(report.target_lines(targets)))
    if pairs:
        print("\n" + "\n".join(pairs))
    if ctx.mode is FULL:
        docs = ROOT / "docs"
        md, png = docs / "benchmarks.md", docs / "benchmarks.png"
    else:
        md, png = ctx.out / "benchmarks.md", ctx.out / "benchmarks.png"
    title = (
        f"workflows on {info['cores (nproc)']} cores, {info['date (UTC)']} UTC ({ctx.mode.name})"
    )
    budget = report.budget_lines(rows, verdict.RATIO_TARGETS)
    print("\n" + "\n".join(budget))
    report.chart(rows, png, title)
    md.write_text(report.markdown(rows, targets, info, setup, png.name, pairs, budget))
    verdict.save_json(ctx, rows, targets, info, ctx.out / "results.json")
    print(f"wrote {md} and {png}")


if __name__ == "__main__":
    sys.exit(main())
