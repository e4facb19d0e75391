"""What HTTP costs a consume: the consume use case called in-process, beside the raw
dequeue and the service over HTTP, in alternating rounds of one run.

    .venv/bin/python bench/floor.py [--rounds 3] [--seconds 8] [--prefill 150000]

Each round, on a fresh database each (prefilled with `--prefill` queued workflows, postgres
backend), in turn:
- raw: pgbench's SKIP LOCKED dequeue at 8 clients, with the queue index, as `make bench`'s
  consume target divides by (tools.pgbench: pinned like the harness);
- in-process, file: 8 asyncio tasks calling the consume use case (`ConsumeWorkflow`, built
  by the container, exports written as the service writes them) in a loop, in one uvloop
  process that is unpinned like the service; no HTTP at all;
- in-process, no file: the same with an exporter that renders the CSV but writes nothing;
- HTTP: the service (the working tree's code, one worker, as `make bench` runs it) under
  wrk at 8 connections, as in `make bench`.
It prints each run's consumes/s, its ratio to the same round's raw rate, the process's CPU
per consume (user + system, from /proc or getrusage) and, in-process, the mean claims per
claim transaction; then the medians. The in-process rate is what the consume path would
reach if HTTP cost nothing: an upper bound for any HTTP server in front of it. Not part of
`make bench`. Export directories are removed only at the end (bench/notes.md, session 13).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import db as dbmod
import tools
from ab import cpu_seconds, one_worker
from runs import QUEUE_INDEX

from bench import ROOT, cpus

TASKS = 8  # the consume concurrency of `make bench`
WARM_UP = 200  # consumes before the measured loop


async def in_process(url: str, exports: str, seconds: float, write: bool) -> dict[str, float]:
    """The inner run (its own process): the consume use case, TASKS callers, no HTTP."""
    from dependency_injector import providers

    from workflows.adapters.postgres import batching
    from workflows.domain.model import Workflow
    from workflows.entrypoints.config import Settings
    from workflows.entrypoints.container import Container, running

    settings = Settings.from_env(
        {"DATABASE_URL": url, "QUEUE_BACKEND": "postgres", "EXPORT_DIR": exports}
    )
    container = Container(settings=settings)
    if not write:
        real = container.exporter()

        class RenderOnly:
            async def render(self, workflow: Workflow) -> bytes:
                return await real.render(workflow)

            async def write(self, workflow: Workflow, content: bytes, now: object) -> None:
                return None

            def __getattr__(self, name: str) -> object:
                return getattr(real, name)

        container.exporter.override(providers.Object(RenderOnly()))
    batches: list[int] = []
    claim = batching.GroupClaim._run

    async def counted(self: batching.GroupClaim, take: Callable[[], list]) -> None:  # type: ignore[type-arg]
        # `_run`, not `run`: with BEGIN sent first (the service's way) the group calls
        # `_run` directly, and the batch is what `take` hands out once BEGIN is answered.
        def counting() -> list:  # type: ignore[type-arg]
            batch = take()
            if batch:
                batches.append(len(batch))
            return batch

        await claim(self, counting)

    batching.GroupClaim._run = counted  # type: ignore[method-assign]
    async with running(container):
        consume = container.consume_workflow()
        for _ in range(WARM_UP):
            await consume()
        batches.clear()
        done = 0
        stop = time.monotonic() + seconds

        async def caller() -> None:
            nonlocal done
            while time.monotonic() < stop:
                if await consume() is None:
                    raise RuntimeError("the queue ran dry: prefill more")
                done += 1

        start, before = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.gather(*(caller() for _ in range(TASKS)))
        elapsed, after = time.monotonic() - start, resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "rate": done / elapsed,
        "cpu_us": cpu / max(done, 1) * 1e6,
        "per_batch": done / max(len(batches), 1),
    }


def run_in_process(url: str, exports: Path, seconds: float, write: bool) -> dict[str, float]:
    command = [sys.executable, __file__, "--inner", url, str(exports), str(seconds)]
    command += ["--write"] if write else []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=seconds + 120)
    if out.returncode != 0:
        raise RuntimeError(f"in-process run failed:\n{out.stderr[-2000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run_http(database: dbmod.Database, out: Path, tag: str, seconds: float) -> dict[str, float]:
    load_cpus = cpus()[1]
    os.environ["PYTHONPATH"] = str(ROOT)
    service = one_worker("postgres", database.url, "", tag, out, tag)
    service.start()
    try:
        env = {"BENCH_BODY": str(ROOT / "bench" / "body.json"), "BENCH_ROWS": "1"}

        def wrk(label: str, duration: float) -> tools.Result:
            url = service.url + "/workflow/consume"
            return tools.wrk(
                label,
                url,
                "consume.lua",
                connections=TASKS,
                seconds=duration,
                cpus=load_cpus,
                env=env,
            )

        wrk("warm-up", 2)
        pids = service.worker_pids()
        before = cpu_seconds(pids)
        result = wrk("http", seconds)
        cpu_us = (cpu_seconds(pids) - before) / max(result.ok, 1) * 1e6
        if result.failures:
            raise RuntimeError(f"{result.failures} consumes failed over HTTP")
    finally:
        service.stop()
    return {"rate": result.rate, "cpu_us": cpu_us}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--prefill", type=int, default=150_000)
    parser.add_argument("--inner", nargs=3, metavar=("URL", "EXPORTS", "SECONDS"))
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if args.inner:
        import uvloop

        url, exports, seconds = args.inner
        print(json.dumps(uvloop.run(in_process(url, exports, float(seconds), args.write))))
        return 0

    out = ROOT / "var" / "floor"
    server = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    _, load_cpus = cpus()
    run_id = time.strftime("%H%M%S")
    kinds = ["in-process, file", "in-process, no file", "HTTP"]
    rows: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    try:
        for round_ in range(args.rounds):
            order = kinds if round_ % 2 == 0 else kinds[::-1]
            raw_rate = 0.0
            for index, kind in enumerate(["raw", *order]):
                tag = f"floor_{run_id}_{round_}_{index}"
                database = dbmod.Database(server, tag)
                database.create()
                try:
                    if kind == "raw":
                        # The raw dequeue's own schema is the service's (migrations) + index.
                        _migrate(database.url)
                        database.prefill(1, args.prefill)
                        database.execute(QUEUE_INDEX)
                        database.settle()
                        result = tools.pgbench(
                            "raw",
                            database.url,
                            "dequeue.sql",
                            clients=TASKS,
                            seconds=args.seconds,
                            cpus=load_cpus,
                        )
                        raw_rate = database.count("consumed") / result.seconds
                        print(
                            f"round {round_} raw dequeue (pgbench): {raw_rate:,.0f}/s", flush=True
                        )
                        continue
                    _migrate(database.url)
                    database.prefill(1, args.prefill)
                    database.settle()
                    file_us = tools.file_cost_us(out / "probe" / tag)
                    if kind == "HTTP":
                        got = run_http(database, out, tag, args.seconds)
                    else:
                        exports = out / "exports" / tag
                        got = run_in_process(
                            database.url, exports, args.seconds, write=kind.endswith(", file")
                        )
                finally:
                    database.drop()
                got["ratio"] = got["rate"] / raw_rate
                rows[kind].append(got)
                got["file_us"] = file_us
                batch = (
                    f", {got['per_batch']:.2f} claims per transaction" if "per_batch" in got else ""
                )
                print(
                    f"round {round_} {kind}: {got['rate']:,.0f}/s ({got['ratio']:.2f} x raw),"
                    f" CPU {got['cpu_us']:,.0f} µs per consume{batch};"
                    f" a file cost {file_us:,.0f} µs just before",
                    flush=True,
                )
    finally:
        shutil.rmtree(out, ignore_errors=True)
    for kind, runs in rows.items():
        if runs:
            med = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            print(
                f"{kind}: median {med['rate']:,.0f}/s, {med['ratio']:.2f} x raw,"
                f" CPU {med['cpu_us']:,.0f} µs per consume"
            )
    return 0


def _migrate(url: str) -> None:
    sys.path.insert(0, str(ROOT))
    from workflows.adapters.postgres.migrations import migrate

    migrate(url)


if __name__ == "__main__":
    raise SystemExit(main())
