"""A/B of two (or more) versions of the service: alternating rounds of one scenario.

    .venv/bin/python bench/ab.py --trees A=HEAD~1,B=worktree --backend postgres \\
        --scenario consume --rounds 4 --seconds 8 [--churn 60000]

Each tree is a git revision (its `workflows/` package, from `git archive`) or `worktree`
(the working tree's, as it is now), put in var/ab/trees/<name> and served by `workflows
serve` with PYTHONPATH pointing there, one worker, pinned like `make bench`. Each round
serves every tree in turn (the order flips every round, so neither always goes first) on a
fresh database (prefilled with `--prefill` workflows, and the broker's queue with their
uuids), runs wrk for 2 s of warm-up and `--seconds` measured, and prints the rate, p50, p99 and
the worker's CPU per request (user + system, from /proc); then the medians, and each tree
against the first round by round (the change in each round, and in how many it was
better). Not part of `make bench`: it only compares versions, in one run, as
bench/notes.md quotes them.

The export directories are removed only at the end: on this host making a file costs
several times more for a while after many were deleted (bench/notes.md, session 13), so
removing a round's files would slow the next round. `--churn N` makes and deletes N files
before every run on purpose, to measure in that state. `--exports /dev/shm/ab` puts them on
tmpfs instead, which keeps that state out of a comparison (and out of the runs after it)
but measures files cheaper than `make bench`'s. `--workers B=2` serves a tree with two
uvicorn workers instead of one. `--connections N` overrides the scenario's
wrk connections (`make bench`'s): a rate that rises with them says the service was waiting,
not busy (bench/notes.md, session 18). `--scenario keepup` measures consumers that keep
up: POSTs on 2 connections and, beside them, long-poll consumes (`?wait=5`) on 8, of an
empty queue, with the rate and the CPU per POST, and (rabbitmq) RabbitMQ's CPU per POST
(bench/notes.md, session 21).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path

import db as dbmod
import tools
from service import Service

from bench import ROOT, cpus, free_port

TICKS = os.sysconf("SC_CLK_TCK")
SCENARIOS = {  # name: (wrk script, path, connections) as in `make bench`
    "consume": ("consume.lua", "/workflow/consume", 8),
    "post": ("post.lua", "/workflow", 32),
    "mixed": ("mixed.lua", "/workflow", 32),
    "get": ("get_one.lua", "/workflow", 32),
    "list": ("list.lua", "/workflow?limit=100", 32),
    # Consumers keeping up: POSTs on 2 connections, and beside them (KEEP_UP) long-poll
    # consumes on 8 of an empty queue; the rate and CPU are per POST.
    "keepup": ("post.lua", "/workflow", 2),
}
KEEP_UP = ("consume.lua", "/workflow/consume?wait=5", 8)


def build(name: str, revision: str, into: Path) -> Path:
    tree = into / name
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    if revision == "worktree":
        shutil.copytree(
            ROOT / "workflows", tree / "workflows", ignore=shutil.ignore_patterns("__pycache__")
        )
    else:
        archive = subprocess.run(
            ["git", "archive", revision, "workflows"], cwd=ROOT, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def one_worker(
    backend: str,
    database_url: str,
    rabbitmq_url: str,
    queue: str,
    out: Path,
    tag: str,
    exports: Path | None = None,
    workers: int = 1,
) -> Service:
    """The service as `make bench` serves it, with one worker (or `workers`), its log in
    `out` and its exports in `exports` (by default `out`/exports)."""
    return Service(
        backend=backend,
        database_url=database_url,
        rabbitmq_url=rabbitmq_url,
        queue=queue,
        port=free_port(),
        workers=workers,
        cpus=cpus()[0],
        export_dir=(exports or out / "exports") / tag,
        log=out / f"{tag}.log",
    )


def broker_pids() -> list[int]:
    """RabbitMQ's Erlang VM (beam.smp), to read its CPU."""
    found = subprocess.run(["pgrep", "-f", "beam.smp"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def churn(directory: Path, count: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        os.close(os.open(directory / str(n), os.O_CREAT | os.O_WRONLY, 0o644))
    shutil.rmtree(directory)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", required=True, help="NAME=REVISION,... (or NAME=worktree)")
    parser.add_argument("--backend", default="postgres", choices=["postgres", "rabbitmq"])
    parser.add_argument("--scenario", default="consume", choices=sorted(SCENARIOS))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--prefill", type=int, default=60_000)
    parser.add_argument("--churn", type=int, default=0, help="files made and deleted per run")
    parser.add_argument(
        "--connections", type=int, help="wrk connections (default: the scenario's in make bench)"
    )
    parser.add_argument(
        "--workers", default="", help="NAME=N,...: uvicorn workers of a tree (default 1)"
    )
    parser.add_argument(
        "--exports", type=Path, help="where the export directories go (default var/ab/exports)"
    )
    args = parser.parse_args()
    out = ROOT / "var" / "ab"
    trees = [
        (name, build(name, revision, out / "trees"))
        for name, revision in (spec.split("=", 1) for spec in args.trees.split(","))
    ]
    workers = {name: int(n) for name, n in (w.split("=", 1) for w in args.workers.split(",") if w)}
    load_cpus = cpus()[1]
    script, path, connections = SCENARIOS[args.scenario]
    connections = args.connections or connections
    exports = args.exports or out / "exports"
    rabbitmq = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
    server = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    env = {"BENCH_BODY": str(ROOT / "bench" / "body.json"), "BENCH_ROWS": str(args.prefill)}
    run_id = time.strftime("%H%M%S")
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in trees}
    try:
        for round_ in range(args.rounds):
            for name, tree in trees if round_ % 2 == 0 else trees[::-1]:
                tag = f"ab_{run_id}_{round_}_{name.lower()}"
                if args.churn:
                    churn(out / "churn", args.churn)
                database = dbmod.Database(server, tag)
                database.create()
                os.environ["PYTHONPATH"] = str(tree)
                queue = tag.replace("_", "-")
                service = one_worker(
                    args.backend,
                    database.url,
                    rabbitmq,
                    queue,
                    out,
                    tag,
                    exports,
                    workers.get(name, 1),
                )
                service.start()
                try:
                    if args.scenario in ("consume", "mixed", "get", "list"):
                        database.prefill(1, args.prefill)
                        if args.backend == "rabbitmq":
                            fill = ["--start", "1", "--count", str(args.prefill)]
                            tools.broker("fill", "fill", url=rabbitmq, queue=queue, extra_args=fill)
                        database.settle()
                    url = service.url + path

                    def wrk(label: str, seconds: float) -> tools.Result:
                        return tools.wrk(
                            label,
                            url,  # noqa: B023 (called in this iteration only)
                            script,
                            connections=connections,
                            seconds=seconds,
                            cpus=load_cpus,
                            env=env,
                        )

                    def keeping_up(label: str, seconds: float) -> tools.Result:
                        """wrk, with the long-poll consumes of KEEP_UP beside it."""
                        beside: list[tools.Result] = []
                        consumer = threading.Thread(
                            target=lambda: beside.append(
                                tools.wrk(
                                    "consumes",
                                    service.url + KEEP_UP[1],  # noqa: B023
                                    KEEP_UP[0],
                                    connections=KEEP_UP[2],
                                    seconds=seconds,
                                    cpus=load_cpus,
                                    env=env,
                                )
                            )
                        )
                        consumer.start()
                        result = wrk(label, seconds)
                        consumer.join()
                        result.notes.append(f"{beside[0].ok:,} consumed" if beside else "")
                        return result

                    run = keeping_up if args.scenario == "keepup" else wrk
                    run("warm-up", 2)
                    pids = service.worker_pids()
                    before, broker_before = cpu_seconds(pids), cpu_seconds(broker_pids())
                    result = run(name, args.seconds)
                    cpu_us = (cpu_seconds(pids) - before) / max(result.ok, 1) * 1e6
                    if args.backend == "rabbitmq":
                        used = cpu_seconds(broker_pids()) - broker_before
                        result.notes.append(f"broker CPU {used / max(result.ok, 1) * 1e6:,.0f} µs")
                finally:
                    service.stop()
                    if args.backend == "rabbitmq":
                        tools.broker("delete", "delete", url=rabbitmq, queue=queue)
                    database.drop()
                results[name].append((result.rate, cpu_us))
                print(
                    f"round {round_} {name}: {result.rate:,.0f}/s, p50 {result.p50_ms:.2f} ms,"
                    f" p99 {result.p99_ms or 0:.2f} ms,"
                    f" worker CPU {cpu_us:,.0f} µs per request, non-2xx {result.failures}"
                    + (f" {result.notes}" if result.notes else ""),
                    flush=True,
                )
    finally:
        shutil.rmtree(exports, ignore_errors=True)
    for name, rows in results.items():
        rates = ", ".join(f"{rate:,.0f}" for rate, _ in rows)
        cpus_ = ", ".join(f"{cpu:,.0f}" for _, cpu in rows)
        print(
            f"{name}: {rates}/s (median {statistics.median(r for r, _ in rows):,.0f});"
            f" worker CPU {cpus_} µs (median {statistics.median(c for _, c in rows):,.0f})"
        )
    print(compare_rounds(results))
    return 0


def compare_rounds(results: dict[str, list[tuple[float, float]]]) -> str:
    """Each later tree against the first, round by round: a round's two runs are seconds
    apart, so their ratio follows the host less than the medians do (bench/notes.md)."""
    names = list(results)
    lines = []
    for name in names[1:]:
        base, rows = results[names[0]], results[name]
        pairs = zip(rows, base, strict=True)
        ratios = [rate / first if first else 0.0 for (rate, _), (first, _) in pairs]
        better = sum(ratio > 1 for ratio in ratios)
        changes = ", ".join(f"{ratio - 1:+.0%}" for ratio in ratios)
        lines.append(
            f"{name} against {names[0]}, round by round: {changes}"
            f" (median {statistics.median(ratios) - 1:+.0%}, better in {better} of {len(ratios)})"
            if ratios
            else f"{name} against {names[0]}: no rounds"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
