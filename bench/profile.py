"""Where a worker's CPU time goes, per scenario: py-spy on one worker under wrk load.

    .venv/bin/pip install py-spy
    .venv/bin/python bench/profile.py [--seconds 15] [--scenarios post,consume]

Starts the service as deployed but with ONE worker (so one process sees every request),
pinned like `make bench`, prefills the database (and the queue), runs each scenario under
wrk while `py-spy record` samples the worker (on-CPU samples only, every thread), and
writes var/bench/profile/<backend>-<scenario>.{txt,svg}: the share of samples in each
part of a request (the first matching rule of CATEGORIES, read from the leaf up) and the
heaviest frames. Not part of `make bench`: profiling slows the worker.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import db as dbmod
import tools
from service import Service

from bench import ROOT, cpus, free_port

BODY = Path(__file__).with_name("body.json")
# (category, regex on "function (file)" frames), matched from the leaf towards the root.
CATEGORIES = [
    (
        "idle: epoll / select / lock wait",
        r"\(poll|select|epoll|_wait_for_tstate_lock|wait \(threading",
    ),
    (
        "JSON parse + validate (schemas.py, json_values.py, fast_parse.py, json, simplejson)",
        r"schemas\.py|json_values\.py|fast_parse\.py|simplejson|/json/",
    ),
    ("CSV render + file write/fsync (csv_export/)", r"csv_export/"),
    ("response render (orjson, starlette Response)", r"rendering\.py|responses\.py"),
    ("psycopg (query, adapt, pool)", r"psycopg"),
    ("pika thread (rabbitmq.py, pika)", r"pika|rabbitmq\.py"),
    ("outbox relay (relay.py)", r"relay\.py"),
    ("logging / metrics / middleware", r"logging|prometheus|observability|security\.py|logs\.py"),
    ("starlette routing + middleware", r"starlette"),
    ("uvicorn + httptools protocol", r"uvicorn|httptools"),
    ("asyncio / uvloop scheduling", r"asyncio|uvloop"),
    ("domain + use cases", r"workflows/(domain|application)"),
]


def classify(stack: list[str]) -> str:
    for frame in reversed(stack):
        for name, pattern in CATEGORIES:
            if re.search(pattern, frame):
                return name
    return "other"


def summarise(raw: Path, out: Path, title: str, requests: int) -> str:
    by_category: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    total = 0
    # Split on newlines only: a frame's text may hold other characters that splitlines()
    # takes for line breaks (py-spy 0.4.3 wrote one such).
    for line in raw.read_text(errors="replace").split("\n"):
        stack_text, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack_text.split(";") if f]
        total += count
        by_category[classify(frames)] += count
        for frame in set(frames):
            inclusive[_short(frame)] += count
        if frames:
            leaf[_short(frames[-1])] += count
    lines = [f"# {title}: {total} samples, {requests} requests", "", "## by part of a request"]
    lines += [f"{100 * n / total:6.1f} %  {name}" for name, n in by_category.most_common()]
    lines += ["", "## heaviest frames, inclusive"]
    lines += [f"{100 * n / total:6.1f} %  {name}" for name, n in inclusive.most_common(45)]
    lines += ["", "## heaviest frames, self"]
    lines += [f"{100 * n / total:6.1f} %  {name}" for name, n in leaf.most_common(30)]
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    return text


def _short(frame: str) -> str:
    return re.sub(r"\(/.*?/(site-packages|lib/python3\.11|workflows)/", r"(\1/", frame)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--backends", default="postgres,rabbitmq")
    parser.add_argument("--scenarios", default="post,consume")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    args = parser.parse_args(argv)
    out = ROOT / "var" / "bench" / "profile"
    out.mkdir(parents=True, exist_ok=True)
    server_cpus, load_cpus = cpus()
    run_id = time.strftime("%Y%m%d%H%M%S")
    database = dbmod.Database(
        "postgresql://postgres@127.0.0.1:5432/postgres", f"bench_profile_{run_id}"
    )
    rabbitmq = "amqp://guest:guest@127.0.0.1:5672/%2F"
    database.create()
    try:
        subprocess.run(
            [str(ROOT / ".venv/bin/workflows"), "migrate"],
            env={"DATABASE_URL": database.url, "PATH": "/usr/bin:/bin"},
            check=True,
            stdout=subprocess.DEVNULL,
        )
        for backend in args.backends.split(","):
            queue = f"bench-profile-{run_id}-{backend}"
            database.reset()
            database.prefill(1, 60_000)
            service = Service(
                backend=backend, database_url=database.url, rabbitmq_url=rabbitmq, queue=queue,
                port=free_port(), workers=1, cpus=server_cpus,
                export_dir=out / "exports" / f"{run_id}-{backend}",
                log=out / f"service-{backend}.log",
            )  # fmt: skip
            service.start()
            try:
                if backend == "rabbitmq":
                    fill = ["--start", "1", "--count", "60000"]
                    tools.broker("fill", "fill", url=rabbitmq, queue=queue, extra_args=fill)
                for scenario in args.scenarios.split(","):
                    _profile(service, backend, scenario, args, out, load_cpus)
            finally:
                service.stop()
                if backend == "rabbitmq":
                    tools.broker("delete", "delete", url=rabbitmq, queue=queue)
    finally:
        database.drop()
        # Deleted only now: a new file's inode costs more for minutes after many deletions
        # (bench/notes.md), and the prefilled uuids are the same in every run, so a kept
        # directory would make the next run's consumes replace files, not make them.
        shutil.rmtree(out / "exports", ignore_errors=True)
    return 0


def _profile(service: Service, backend: str, scenario: str, args, out: Path, load_cpus) -> None:  # type: ignore[no-untyped-def]
    script, path, conns = {
        "post": ("post.lua", "/workflow", 32),
        "consume": ("consume.lua", "/workflow/consume", 8),
        "get": ("get_one.lua", "/workflow", 32),
        "list": ("list.lua", "/workflow?limit=100", 32),
    }[scenario]
    env = {"BENCH_BODY": str(BODY), "BENCH_ROWS": "10000"}
    url = service.url + path
    tools.wrk(scenario, url, script, connections=conns, seconds=3, cpus=load_cpus, env=env)
    raw = out / f"{backend}-{scenario}.raw"
    pid = service.worker_pids()[0]
    spy = subprocess.Popen(
        [str(ROOT / ".venv/bin/py-spy"), "record", "-p", str(pid), "-r", str(args.rate),
         "-d", str(int(args.seconds) - 2), "--format", "raw", "-o", str(raw), "--threads",
         "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    result = tools.wrk(
        scenario, url, script, connections=conns, seconds=args.seconds, cpus=load_cpus, env=env
    )
    spy.wait(timeout=60)
    title = f"{backend} {scenario}: {result.rate:.0f} req/s, p50 {result.p50_ms:.1f} ms"
    print(summarise(raw, out / f"{backend}-{scenario}.txt", title, result.ok), flush=True)


if __name__ == "__main__":
    sys.exit(main())
