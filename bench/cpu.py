"""Where the machine's CPU went during a run: the service, PostgreSQL, RabbitMQ, the rest.

Read from /proc before and after the run: the machine's busy time (/proc/stat) and, per
group of processes (by `comm`), user + system time of every live process plus what its
reaped children used (cutime + cstime: a PostgreSQL backend that exits during the run is
counted in the postmaster's). "rest" is the machine's busy time that no group explains:
the load generator (wrk, pgbench, bench/broker.py), the kernel's own work, anything else
on the host.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
GROUPS = {"workflows": "service", "postgres": "PostgreSQL", "beam.smp": "RabbitMQ"}
"""`comm` of a process → its group. The service runs as `.venv/bin/workflows serve`."""
ORDER = ("service", "PostgreSQL", "RabbitMQ", "rest")
QUIET_CORES = 0.2
"""Cores busy under which the machine counts as quiet before a run (ssh, a shell, an idle
PostgreSQL and RabbitMQ stay under it)."""
QUIET_SECONDS = 3


@dataclass
class Snapshot:
    wall_ticks: float  # busy + idle of all cores, in ticks
    busy_ticks: float
    groups: dict[str, float]  # ticks by group


def snapshot() -> Snapshot:
    total, busy = snapshot_busy()
    groups = dict.fromkeys(GROUPS.values(), 0.0)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        group = GROUPS.get(comm)
        if group is None:
            continue
        rest = stat[stat.rindex(")") + 2 :].split()
        # after the comm: state(0) ... utime(11) stime(12) cutime(13) cstime(14)
        groups[group] += sum(float(rest[i]) for i in (11, 12, 13, 14))
    return Snapshot(total, busy, groups)


def between(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """CPU seconds by group (and "rest"), and "cores busy": the machine's busy time over
    the wall time of one core."""
    cores = os.cpu_count() or 1
    wall = (after.wall_ticks - before.wall_ticks) / cores
    busy = after.busy_ticks - before.busy_ticks
    used = {g: max(0.0, (after.groups[g] - before.groups[g]) / TICKS) for g in after.groups}
    used["rest"] = max(0.0, busy / TICKS - sum(used.values()))
    used["cores busy"] = busy / wall if wall else 0.0
    return used


def per_op(cpu: dict[str, float], ops: int) -> str:
    """`service 310 / PostgreSQL 140 / RabbitMQ 0 / rest 90`, in µs per operation."""
    if not ops:
        return "—"
    return " / ".join(f"{cpu[g] / ops * 1e6:,.0f}" for g in ORDER)


def busy_cores(seconds: float = 1.0) -> float:
    """How many cores the whole machine kept busy over the next `seconds`."""
    before = snapshot_busy()
    time.sleep(seconds)
    after = snapshot_busy()
    wall = (after[0] - before[0]) / (os.cpu_count() or 1)
    return (after[1] - before[1]) / wall if wall else 0.0


def snapshot_busy() -> tuple[float, float]:
    """(busy + idle, busy) ticks of all cores, from /proc/stat alone (no process walk)."""
    # user nice system idle iowait irq softirq steal (guest time is already in user)
    fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields[i] for i in (0, 1, 2, 5, 6, 7) if i < len(fields))
    return busy + fields[3] + (fields[4] if len(fields) > 4 else 0.0), busy


def wait_until_quiet(
    *, below: float = QUIET_CORES, seconds: int = QUIET_SECONDS, limit: float = 120.0
) -> tuple[float, list[float]]:
    """Wait until the machine has kept fewer than `below` cores busy for `seconds` one-second
    samples in a row, or `limit` seconds have passed: the time waited, and the samples of
    the last `seconds` (what the run started on). Work left over from before a run (a
    test suite's clean-up, the kernel freeing many deleted files) otherwise lands in its
    first scenarios as "rest" CPU (bench/notes.md, session 20)."""
    started = time.monotonic()
    samples: list[float] = []
    while True:
        samples.append(busy_cores())
        recent = samples[-seconds:]
        if len(recent) == seconds and max(recent) < below:
            break
        if time.monotonic() - started >= limit:
            break
    return time.monotonic() - started, samples[-seconds:]
