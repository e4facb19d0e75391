"""The load generators: pgbench, wrk and bench/broker.py, each pinned to the load cores."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cpu

HERE = Path(__file__).resolve().parent
LUA = HERE / "lua"
PGBENCH = HERE / "pgbench"


LOAD_NICENESS = -10
"""Load generators run at this niceness when the harness may raise priority (root): the
service shares their core on a 2-core machine, and a load generator kept waiting by it
would add its own wait to the latencies it reports. Raw and HTTP runs alike."""


def pinned(cpus: str | None, command: list[str]) -> list[str]:
    if os.geteuid() == 0:
        command = ["nice", "-n", str(LOAD_NICENESS), *command]
    return ["taskset", "-c", cpus, *command] if cpus else command


@dataclass
class Result:
    """One measured run: a raw limit or an HTTP scenario."""

    name: str
    kind: str  # "raw" or "http"
    concurrency: int
    seconds: float
    ok: int  # successful operations (2xx responses; committed transactions; messages)
    p50_ms: float | None
    p99_ms: float | None
    failures: int = 0  # non-2xx responses, failed transactions: the harness counts them
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


def pgbench(
    name: str,
    db_url: str,
    script: str,
    *,
    clients: int,
    seconds: float,
    cpus: str | None,
    variables: dict[str, str] | None = None,
) -> Result:
    """Run a custom pgbench script (prepared statements, as psycopg uses them)."""
    command = ["pgbench", "-n", "-M", "prepared", "-c", str(clients), "-j", "1"]
    command += ["-T", str(max(1, round(seconds))), "-f", str(PGBENCH / script), "-r"]
    logs = Path(tempfile.mkdtemp(prefix="pgbench-"))
    command += ["--log", f"--log-prefix={logs}/tx"]  # one line per transaction: its latency
    for key, value in (variables or {}).items():
        command += ["-D", f"{key}={value}"]
    command.append(db_url)
    before = cpu.snapshot()
    out = subprocess.run(
        pinned(cpus, command), capture_output=True, text=True, check=False, timeout=seconds + 120
    )
    used = cpu.between(before, cpu.snapshot())
    if out.returncode != 0:
        tail = "\n".join(out.stderr.strip().splitlines()[-6:])
        raise RuntimeError(f"pgbench {script} failed (exit {out.returncode}):\n{tail}")
    text = out.stdout
    processed = int(_search(r"number of transactions actually processed: (\d+)", text))
    failed = int(_search(r"number of failed transactions: (\d+)", text, "0"))
    duration = float(_search(r"duration: (\d+) s", text))
    latencies = sorted(_transaction_latencies(logs))
    shutil.rmtree(logs, ignore_errors=True)
    return Result(
        name,
        "raw",
        clients,
        duration,
        processed,
        percentile(latencies, 50),
        percentile(latencies, 99),
        failed,
        extra={"cpu": used},
    )


def _transaction_latencies(logs: Path) -> list[float]:
    """Milliseconds, from pgbench's per-transaction log: `client tx latency_us script s us`."""
    latencies: list[float] = []
    for path in logs.iterdir():
        with path.open() as file:
            for line in file:
                latency = line.split()[2]
                if latency.isdigit():  # failed transactions log a word instead
                    latencies.append(int(latency) / 1e3)
    return latencies


def percentile(values: list[float], p: float) -> float | None:
    """The p-th percentile of sorted values (nearest rank)."""
    if not values:
        return None
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def wrk(
    name: str,
    url: str,
    script: str,
    *,
    connections: int,
    seconds: float,
    cpus: str | None,
    env: dict[str, str] | None = None,
) -> Result:
    """Run wrk (one thread) with a Lua script of bench/lua; parse the line its done() prints."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    command += ["--timeout", "10s", "-s", str(LUA / script), url]
    environment = {**os.environ, "BENCH_LUA": str(LUA), **(env or {})}
    before = cpu.snapshot()
    out = subprocess.run(
        pinned(cpus, command),
        capture_output=True,
        text=True,
        env=environment,
        check=False,
        timeout=seconds + 60,
    )
    used = cpu.between(before, cpu.snapshot())
    match = re.search(r"^BENCH_JSON (.*)$", out.stdout, re.MULTILINE)
    if out.returncode != 0 or match is None:
        raise RuntimeError(f"wrk {script} failed:\n{out.stdout}\n{out.stderr}")
    report = json.loads(match.group(1))
    statuses = {int(k): v for k, v in report["statuses"].items()}
    ok = sum(v for k, v in statuses.items() if 200 <= k < 300)
    bad = sum(v for k, v in statuses.items() if not 200 <= k < 300)
    errors = report["errors"]
    result = Result(
        name,
        "http",
        connections,
        report["duration_us"] / 1e6,
        ok,
        report["p50_us"] / 1e3,
        report["p99_us"] / 1e3,
        bad,
        extra={
            "statuses": statuses,
            "socket_errors": errors,
            "max_ms": report["max_us"] / 1e3,
            "cpu": used,
        },
    )
    socket_errors = sum(errors[k] for k in ("connect", "read", "write", "timeout"))
    if socket_errors:
        result.notes.append(f"socket errors {errors}")
    return result


def broker(
    name: str,
    command: str,
    *,
    url: str,
    queue: str,
    clients: int = 1,
    seconds: float = 1.0,
    cpus: str | None = None,
    extra_args: list[str] | None = None,
) -> dict[str, Any]:
    args = [sys.executable, str(HERE / "broker.py"), command, "--url", url, "--queue", queue]
    args += ["--clients", str(clients), "--seconds", str(seconds), *(extra_args or [])]
    before = cpu.snapshot()
    out = subprocess.run(
        pinned(cpus, args), capture_output=True, text=True, check=False, timeout=seconds + 180
    )
    used = cpu.between(before, cpu.snapshot())
    if out.returncode != 0:
        raise RuntimeError(f"broker.py {command} failed:\n{out.stdout}\n{out.stderr}")
    report: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    report["cpu"] = used
    return report


def broker_result(name: str, report: dict[str, Any]) -> Result:
    result = Result(
        name,
        "raw",
        report["clients"],
        report["seconds"],
        report["ops"],
        report["p50_ms"],
        report["p99_ms"],
        extra={"cpu": report["cpu"]},
    )
    if report.get("empty_gets"):
        result.notes.append(f"ran dry ({report['empty_gets']} empty gets)")
    return result


def _search(pattern: str, text: str, default: str | None = None) -> str:
    match = re.search(pattern, text)
    if match is None:
        if default is not None:
            return default
        raise RuntimeError(f"pgbench output has no {pattern!r}:\n{text}")
    return match.group(1)


def file_cost_us(directory: Path, count: int = 2000) -> float:
    """CPU µs to make one 700-byte file (create, write, close) in `directory`, a new one whose
    files the caller removes later: tens of µs normally, hundreds for minutes after many
    deletions on this host (bench/notes.md, session 13), which a consume run feels too."""
    directory.mkdir(parents=True)
    content = b"x" * 700
    start = time.process_time()
    for n in range(count):
        fd = os.open(directory / str(n), os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, content)
        os.close(fd)
    return (time.process_time() - start) / count * 1e6
