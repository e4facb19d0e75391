"""Instructions per request: versions of the service compared by what they execute, not by
how fast this noisy host runs them.

    .venv/bin/python bench/instructions.py --trees A=HEAD~1,B=worktree --scenario consume \\
        [--requests 2000] [--rounds 2] [--connections 8]

Each tree (a git revision or `worktree`, built as bench/ab.py builds them) is served by one
`workflows serve` process under `valgrind --tool=callgrind` with instrumentation off, on a
fresh database (prefilled for consume). After a warm-up, instrumentation is turned on
(`callgrind_control -i on`), `--requests` requests go on `--connections` keep-alive
connections from a small client in this process (not measured), and it is turned off
again: the process's user-space instructions in that window (every thread), divided by the
requests, are the figure, with the requests per database transaction in the same window.
The kernel's work (sockets, files) is not counted, nor PostgreSQL's.

Read the two together. Work that depends on no timing (a CSV render: the same instructions
to the unit in every run) compares exactly. But under valgrind the service runs ~50 x
slower than its client and database, and how many consumes share a claim transaction
follows that timing: a change that makes the service faster there groups more consumes per
transaction, and each transaction is several hundred thousand instructions, so the total
moves by more than the change's own cost (bench/notes.md, session 32: 1.93-2.46 against
3.67 consumes per transaction). Timed A/Bs (bench/ab.py) remain the judge of a speed-up.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import db as dbmod
from ab import build
from service import end_group

from bench import ROOT, free_port

PATHS = {"consume": ("GET", "/workflow/consume"), "post": ("POST", "/workflow")}
START_TIMEOUT = 600.0


async def load(
    port: int, method: str, path: str, requests: int, connections: int
) -> dict[int, int]:
    """`requests` requests over `connections` keep-alive connections; the statuses seen."""
    body = dbmod.BODY.read_bytes() if method == "POST" else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    request = (head + "\r\n").encode() + body
    left = requests
    statuses: dict[int, int] = {}

    async def client() -> None:
        nonlocal left
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while left > 0:
                left -= 1
                writer.write(request)
                status_line = await reader.readline()
                status = int(status_line.split()[1])
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(connections)))
    return statuses


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def callgrind_control(*arguments: str) -> None:
    subprocess.run(["callgrind_control", *arguments], check=True, capture_output=True, timeout=120)


def measure(
    tree: Path, args: argparse.Namespace, out: Path, tag: str
) -> tuple[float, float, dict[int, int]]:
    """Instructions per request of one tree's service, and the statuses it answered."""
    server = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    database = dbmod.Database(server, tag)
    database.create()
    port = free_port()
    profile = out / f"{tag}.callgrind"
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "DATABASE_URL": database.url,
        "RABBITMQ_URL": os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"),
        "RABBITMQ_QUEUE": tag.replace("_", "-"),
        "QUEUE_BACKEND": args.backend,
        "EXPORT_DIR": str(out / "exports" / tag),
        "LOG_LEVEL": "WARNING",
    }
    serve = "import sys; from workflows.entrypoints.cli import main; sys.exit(main())"
    command = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={profile}",
        sys.executable,
        "-c",
        serve,
        "serve",
        "--port",
        str(port),
    ]
    method, path = PATHS[args.scenario]
    with (out / f"{tag}.log").open("ab") as log:
        process = subprocess.Popen(  # in the tree: `-c` puts the working directory first
            command,
            cwd=tree,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{tag}: the service did not start; see {out / tag}.log")
            time.sleep(1)
        if args.scenario == "consume":
            database.prefill(1, args.requests + args.warmup + 100)
            if args.backend == "rabbitmq":
                raise SystemExit("consume with rabbitmq: fill the broker's queue first (todo)")
            database.settle()
        asyncio.run(load(port, method, path, args.warmup, args.connections))
        commits = transactions(database)
        callgrind_control("-i", "on", str(process.pid))
        statuses = asyncio.run(load(port, method, path, args.requests, args.connections))
        callgrind_control("-i", "off", str(process.pid))
        commits = transactions(database) - commits
    finally:
        end_group(process, 120)
        database.drop()
    text = profile.read_text(errors="replace")
    found = re.search(r"^totals: (\d+)", text, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"{profile}: no instruction total")
    return int(found.group(1)) / args.requests, args.requests / max(commits, 1), statuses


def transactions(database: dbmod.Database) -> int:
    """Transactions the database has committed (its statistics, a second late at most)."""
    time.sleep(1.5)
    rows = database.execute(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
    )
    return int(rows[0][0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", required=True, help="NAME=REVISION,... (or NAME=worktree)")
    parser.add_argument("--scenario", default="consume", choices=sorted(PATHS))
    parser.add_argument("--backend", default="postgres", choices=["postgres"])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1, help="runs of each tree, in turn")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    out = ROOT / "var" / "instructions"
    out.mkdir(parents=True, exist_ok=True)
    run_id = time.strftime("%H%M%S")
    trees = [
        (name, build(name, revision, out / "trees"))
        for name, revision in (spec.split("=", 1) for spec in args.trees.split(","))
    ]
    results: dict[str, list[float]] = {name: [] for name, _ in trees}
    try:
        for round_ in range(args.rounds):
            for name, tree in trees:
                tag = f"in_{run_id}_{round_}_{name.lower()}"
                per_request, grouped, statuses = measure(tree, args, out, tag)
                results[name].append(per_request)
                print(
                    f"round {round_} {name}: {per_request:,.0f} instructions per request;"
                    f" {grouped:.2f} requests per database transaction; statuses {statuses}",
                    flush=True,
                )
    finally:
        shutil.rmtree(out / "exports", ignore_errors=True)
    first_name = trees[0][0]
    first = statistics.median(results[first_name])
    for name, counts in results.items():
        median = statistics.median(counts)
        print(f"{name}: median {median:,.0f} per request, {median / first:.3f} x {first_name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
