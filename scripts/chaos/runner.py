"""One scenario: start the targets, load them while the fault acts, drain, check, clean up."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from scripts.chaos import services
from scripts.chaos.api import Target
from scripts.chaos.faults import Fault
from scripts.chaos.load import REQUEST_TIMEOUT, Ledger, consumer, disconnector, poster
from scripts.chaos.report import Row
from scripts.chaos.verify import audit_deletions, check, drain

log = logging.getLogger("chaos")

LONG_POLL = 2.0
TAIL = 3.0
"""Seconds the load goes on after a scheduled fault is over: recovery is seen under load."""


@dataclass(frozen=True)
class Plan:
    mode: str
    duration: float
    posters: int = 8
    consumers: int = 4
    disconnectors: int = 4
    csv_sample: int | None = None
    keep: bool = False


async def run_scenario(fault: Fault, backends: list[str], plan: Plan, workdir: Path) -> list[Row]:
    """Run `fault` against one target per backend, all at once; one row per target."""
    targets = [
        Target(
            fault.name,
            backend,
            workdir,
            keep=plan.keep,
            own_filesystem=fault.own_filesystem,
            reachable_exports=fault.audits_deletions,
        )
        for backend in backends
    ]
    rows = {t.backend: Row(fault.name, t.backend) for t in targets}
    ledgers = {t.backend: Ledger(tag=t.name) for t in targets}
    counts: Counter[str] = Counter()
    try:
        log.info("scenario %s on %s: starting", fault.name, ", ".join(backends))
        await asyncio.gather(*(target.start() for target in targets))
        if fault.audits_deletions:
            await asyncio.gather(*(asyncio.to_thread(audit_deletions, t) for t in targets))
        started = time.monotonic()
        await _load(fault, targets, ledgers, plan, counts)
        for row in rows.values():
            row.load_seconds = time.monotonic() - started
        log.info("scenario %s: load over (%s); draining", fault.name, dict(counts))
        await asyncio.to_thread(_restore_or_raise)
        await asyncio.gather(*(drain(t, ledgers[t.backend]) for t in targets))
        log.info("scenario %s: drained; checking", fault.name)
        for target in targets:
            outcome = await check(target, ledgers[target.backend], plan.csv_sample)
            row = rows[target.backend]
            row.counts, row.notes = outcome.counts, outcome.notes
            row.violations = outcome.violations
    except Exception as error:
        log.exception("scenario %s failed", fault.name)
        for row in rows.values():
            row.error = f"{type(error).__name__}: {error}"
    finally:
        for target in targets:  # before the teardown, which removes the API's log
            row = rows[target.backend]
            row.fault = _fault_summary(fault, target, counts, ledgers, row.counts)
        log.info("scenario %s: tearing down", fault.name)
        await asyncio.to_thread(_teardown, targets, rows)
        log.info("scenario %s: done", fault.name)
    return list(rows.values())


async def _load(
    fault: Fault,
    targets: list[Target],
    ledgers: dict[str, Ledger],
    plan: Plan,
    counts: Counter[str],
) -> None:
    stop = asyncio.Event()
    clients = []
    for target in targets:
        url, ledger = target.base_url, ledgers[target.backend]
        # Half the clients of each kind use a feature that faults could break: POSTs with
        # an Idempotency-Key, retried; consume calls that long-poll (?wait=2).
        clients += [
            poster(url, ledger, n, stop, idempotent=n % 2 == 1) for n in range(plan.posters)
        ]
        clients += [
            consumer(url, ledger, stop, long_poll=LONG_POLL if n % 2 else 0)
            for n in range(plan.consumers)
        ]
        if fault.disconnectors:
            clients += [disconnector(url, ledger, stop) for _ in range(plan.disconnectors)]
    load = [asyncio.create_task(client) for client in clients]
    injected = asyncio.create_task(fault.inject(targets, stop, plan.duration, counts))
    try:
        if fault.continuous:
            await asyncio.sleep(plan.duration)
        else:
            await asyncio.gather(asyncio.sleep(plan.duration), _then_tail(injected))
    finally:
        stop.set()
        await asyncio.wait(load, timeout=REQUEST_TIMEOUT + 10)
        for task in load:
            task.cancel()
        outcomes = await asyncio.gather(*load, injected, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome


async def _then_tail(task: asyncio.Task[None]) -> None:
    await task
    await asyncio.sleep(TAIL)


def _restore_or_raise() -> None:
    problems = services.restore()
    if problems:
        raise RuntimeError("; ".join(problems))


def _teardown(targets: list[Target], rows: dict[str, Row]) -> None:
    problems = services.restore()  # the API and the drop need PostgreSQL
    for target in targets:
        target.stop()
        failed = not rows[target.backend].ok
        try:
            target.cleanup(keep_files=failed or target.keep)
        except Exception as error:
            log.warning("%s: cleanup failed: %r", target.label, error)
        if target.broker_left:
            log.info("%s: the queue still held %d messages", target.label, target.broker_left)
        if failed or target.keep:
            log.warning("%s: log and exports kept in %s", target.label, target.workdir)
            if target.exports_base != target.workdir:
                log.warning("%s: its exports in %s", target.label, target.exports_base)
    if problems:
        raise RuntimeError(f"services not restored: {problems}")


def _fault_summary(
    fault: Fault,
    target: Target,
    counts: Counter[str],
    ledgers: dict[str, Ledger],
    checked: dict[str, int],
) -> str:
    if fault.name == "kill-worker":
        return f"{counts[f'{target.backend} kill -9']} kill -9"
    if fault.name == "rabbitmq-outage":
        return f"down ~{counts['rabbitmq down s']} s"
    if fault.name == "postgres-restart":
        done = [f"{n} {key.split()[1]}" for key, n in counts.items() if key.startswith("postgres")]
        return " + ".join(done) + " restart(s)"
    if fault.name == "consume-disconnect":
        return f"{ledgers[target.backend].consume_abandoned} dropped calls"
    if fault.name == "prune":
        b = target.backend
        runs = f"{counts[f'{b} prune finished']} prune runs + {counts[f'{b} prune killed']} kill -9"
        return f"{runs}, {checked.get('pruned', '?')} workflows pruned"
    if fault.name == "export-freeze":
        return f"{counts['export freezes']} freeze(s), {target.stalls_logged} stall(s) logged"
    return "none"
