"""After the load: drain the queue, then hold what the clients saw against the database,
the export directory and the API."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg

from scripts.chaos.api import Target
from scripts.chaos.load import ERROR_PAUSE, Ledger, consume_once, new_client

log = logging.getLogger("chaos")

OUTBOX_TIMEOUT = 90.0
DRAIN_TIMEOUT = 240.0
EMPTY_IN_A_ROW = 5
EMPTY_GAP = 0.5  # seconds between the confirming 204s: the relay sweeps every second
DRAIN_CLIENTS = 4

ROWS = """
SELECT uuid::text, status::text, data->>'chaos', dead_lettered_at IS NOT NULL, delivery_attempts
FROM workflows
"""
OUTBOX = "SELECT count(*) FROM outbox"

AUDIT = """
CREATE TABLE chaos_deleted (
    uuid uuid NOT NULL, status text NOT NULL, marker text, exported boolean NOT NULL
);
CREATE FUNCTION chaos_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO chaos_deleted VALUES (
        OLD.uuid, OLD.status::text, OLD.data->>'chaos',
        pg_stat_file({directory} || '/' || OLD.uuid::text || '.csv', true) IS NOT NULL
    );
    RETURN OLD;
END $$;
CREATE TRIGGER chaos_deleted AFTER DELETE ON workflows
    FOR EACH ROW EXECUTE FUNCTION chaos_deleted();
"""
"""Every row deleted from `workflows` (a prune), with its status then and whether its export
file was there when the row went (a prune removes the files after the rows)."""
DELETED = "SELECT uuid::text, status, marker, exported FROM chaos_deleted"

VIOLATIONS = {
    "missing": "answered 201 but not in the database",
    "duplicated": "rows beyond the first for one POST (marker)",
    "consumed_twice": "workflows returned by two successful consume calls",
    "left_inserted": "workflows still inserted after the drain: unreachable by consume",
    "dead_lettered": "(of those) dead-lettered: a healthy workflow parked by faults",
    "outbox_left": "outbox rows left after the drain",
    "unaccounted": "consumed in the database, returned by no call, no export file",
    "over_consumed": "more workflows consumed than consume calls could account for",
    "csv_mismatch": "a consume body that differs from its export file or GET …/csv",
    "pruned_unconsumed": "deleted by a prune while not consumed: an accepted workflow lost",
    "contract": "answers that break the API contract (e.g. 200 without X-Workflow-UUID)",
}


@dataclass
class Outcome:
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def violations(self) -> dict[str, int]:
        return {name: self.counts.get(name, 0) for name in VIOLATIONS if self.counts.get(name)}


def audit_deletions(target: Target) -> None:
    """Record every row deleted from the target's `workflows` table (`AUDIT`)."""
    directory = "'" + str(target.export_dir).replace("'", "''") + "'"
    with psycopg.connect(target.database, autocommit=True, connect_timeout=10) as conn:
        conn.execute(AUDIT.replace("{directory}", directory))


def _outbox_size(database: str) -> int:
    with psycopg.connect(database, connect_timeout=10) as conn:
        row = conn.execute(OUTBOX).fetchone()
    return int(row[0]) if row else 0


async def drain(target: Target, ledger: Ledger) -> None:
    """Wait for an empty outbox, then consume until the queue answers 204 several times in
    a row (the relay sweeps the outbox every second), all within bounds."""
    started = time.monotonic()
    left = -1
    while left != 0 and time.monotonic() < started + OUTBOX_TIMEOUT:
        try:
            left = await asyncio.to_thread(_outbox_size, target.database)
        except psycopg.OperationalError as error:
            log.warning("%s: outbox poll failed: %s", target.label, error)
        if left:
            await asyncio.sleep(0.5)
    waited = time.monotonic() - started
    log.info("%s: %d outbox rows left after %.1f s", target.label, max(left, 0), waited)
    deadline = time.monotonic() + DRAIN_TIMEOUT

    async def empty_the_queue() -> None:
        async with new_client(target.base_url) as client:
            while time.monotonic() < deadline:
                status = await consume_once(client, ledger)
                if status == 204:
                    return
                if status != 200:
                    await asyncio.sleep(ERROR_PAUSE)

    while time.monotonic() < deadline:
        await asyncio.gather(*(empty_the_queue() for _ in range(DRAIN_CLIENTS)))
        async with new_client(target.base_url) as client:
            in_a_row = 0
            while in_a_row < EMPTY_IN_A_ROW and time.monotonic() < deadline:
                in_a_row = in_a_row + 1 if await consume_once(client, ledger) == 204 else 0
                await asyncio.sleep(EMPTY_GAP)
        if in_a_row >= EMPTY_IN_A_ROW:
            log.info("%s: drained after %.1f s", target.label, time.monotonic() - started)
            return
    log.warning("%s: the drain did not finish in %.0f s", target.label, DRAIN_TIMEOUT)


async def check(target: Target, ledger: Ledger, csv_sample: int | None) -> Outcome:
    rows, outbox, deleted = await asyncio.to_thread(_read_database, target.database)
    outcome = Outcome()
    c = outcome.counts
    by_marker: dict[str, list[tuple[str, str]]] = {}
    status_of: dict[str, str] = {}
    dead: list[str] = []
    attempts: Counter[int] = Counter()
    for uuid, status, marker, dead_lettered, delivery_attempts in rows:
        by_marker.setdefault(marker, []).append((uuid, status))
        status_of[uuid] = status
        attempts[delivery_attempts] += 1
        if dead_lettered:
            dead.append(uuid)

    pruned: dict[str, bool] = {}  # deleted while consumed: whether its file was there
    if deleted is not None:
        c["pruned"] = len(deleted)
        lost_rows = [(uuid, status) for uuid, status, _, _ in deleted if status != "consumed"]
        c["pruned_unconsumed"] = len(lost_rows)
        if lost_rows:
            outcome.notes.append(f"deleted while not consumed (first 5): {lost_rows[:5]}")
        for uuid, status, marker, exported in deleted:
            by_marker.setdefault(marker, []).append((uuid, status))
            if status == "consumed":
                status_of[uuid] = status
                pruned[uuid] = exported

    c["posted"] = len(ledger.posted)
    c["missing"] = sum(
        1
        for marker, uuid in ledger.posted.items()
        if all(found != uuid for found, _ in by_marker.get(marker, ()))
    )
    c["duplicated"] = sum(len(found) - 1 for found in by_marker.values() if len(found) > 1)
    stored_without_201 = [m for m in by_marker if m not in ledger.posted]
    c["stored_without_201"] = len(stored_without_201)
    refused = [m for m in stored_without_201 if m in ledger.post_refused]
    c["refused_but_stored"] = len(refused)
    if refused:  # the README says a 503 changed nothing: an ambiguous commit
        examples = [(m, ledger.post_refused[m], by_marker[m][0][0]) for m in refused[:3]]
        outcome.notes.append(
            f"{len(refused)} POSTs answered 5xx were stored all the same "
            f"(marker, status, stored uuid): {examples}"
        )
    c["consumed_ok"] = len(ledger.consumed)
    c["consumed_twice"] = sum(1 for digests in ledger.consumed.values() if len(digests) > 1)
    inserted = [uuid for uuid, status in status_of.items() if status == "inserted"]
    c["left_inserted"] = len(inserted)
    c["dead_lettered"] = len(dead)
    if dead:
        outcome.notes.append(f"dead-lettered (first 5): {dead[:5]}")
    if set(attempts) - {0}:
        outcome.notes.append(f"rows by delivery_attempts: {dict(sorted(attempts.items()))}")
    c["outbox_left"] = outbox
    if inserted:
        outcome.notes.append(f"left inserted (first 5): {inserted[:5]}")

    consumed_in_db = {uuid for uuid, status in status_of.items() if status == "consumed"}
    not_returned = consumed_in_db - ledger.consumed.keys()
    exports = target.export_dir
    lost = [
        uuid
        for uuid in not_returned
        if (pruned[uuid] if uuid in pruned else (exports / f"{uuid}.csv").is_file())
    ]
    c["lost_accounted"] = len(lost)
    c["unaccounted"] = len(not_returned) - len(lost)
    if c["unaccounted"]:
        outcome.notes.append(f"consumed, no call, no file: {sorted(not_returned - set(lost))[:5]}")
    returned_not_consumed = [u for u in ledger.consumed if status_of.get(u) != "consumed"]
    c["contract"] = len(ledger.oddities) + len(returned_not_consumed)
    if returned_not_consumed:
        outcome.notes.append(f"returned by consume, not consumed: {returned_not_consumed[:5]}")
    silent = ledger.consume_unanswered + ledger.consume_abandoned
    if len(lost) > silent:  # so some calls answered 5xx had consumed a workflow
        outcome.notes.append(
            f"at least {len(lost) - silent} consume calls answered 5xx had consumed a "
            f"workflow ({len(lost)} responses lost, {silent} calls got no answer at all)"
        )
    allowance = ledger.consume_calls_without_result
    c["over_consumed"] = max(0, len(not_returned) - allowance)

    c["csv_mismatch"] = _compare_exports(exports, ledger, pruned, outcome)
    c["csv_mismatch"] += await _compare_downloads(target, ledger, lost, pruned, csv_sample, outcome)
    c["server_errors"] = ledger.server_errors
    c["transport_errors"] = ledger.transport_errors
    c["abandoned"] = ledger.consume_abandoned
    c["post_retries"] = ledger.post_retries
    c["post_replayed"] = ledger.post_replayed
    return outcome


Deleted = list[tuple[str, str, str, bool]]
"""Rows deleted from `workflows`: uuid, status, marker, whether its export file was there."""


def _read_database(
    database: str,
) -> tuple[list[tuple[str, str, str, bool, int]], int, Deleted | None]:
    with psycopg.connect(database, connect_timeout=10) as conn:
        rows = [(str(u), str(s), str(m), d, a) for u, s, m, d, a in conn.execute(ROWS)]
        count = conn.execute(OUTBOX).fetchone()
        audited = conn.execute("SELECT to_regclass('chaos_deleted') IS NOT NULL").fetchone()
        deleted = None
        if audited and audited[0]:
            deleted = [(str(u), str(s), str(m), bool(e)) for u, s, m, e in conn.execute(DELETED)]
    return rows, int(count[0]) if count else 0, deleted


def _compare_exports(
    exports: Path, ledger: Ledger, pruned: dict[str, bool], outcome: Outcome
) -> int:
    """Each 200 body against the export file the server wrote for it (unless a prune has
    removed the file with the workflow)."""
    mismatches = 0
    for uuid, digests in ledger.consumed.items():
        path = exports / f"{uuid}.csv"
        if uuid in pruned and not path.is_file():
            continue
        found = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        if any(digest != found for digest in digests):
            mismatches += 1
            outcome.notes.append(f"{uuid}: consume body != export file ({path})")
    return mismatches


async def _compare_downloads(
    target: Target,
    ledger: Ledger,
    lost: list[str],
    pruned: dict[str, bool],
    sample: int | None,
    outcome: Outcome,
) -> int:
    """GET /workflow/{uuid}/csv against the consume body (or, for a response that was
    lost, against its export file): every workflow, or a random sample. A pruned workflow
    must answer 404."""
    expected: dict[str, str | None] = {
        uuid: digests[0] for uuid, digests in ledger.consumed.items()
    }
    for uuid in lost:
        if uuid not in pruned:
            content = (target.export_dir / f"{uuid}.csv").read_bytes()
            expected[uuid] = hashlib.sha256(content).hexdigest()
    for uuid in pruned:
        expected[uuid] = None
    uuids = list(expected)
    if sample is not None and len(uuids) > sample:
        uuids = random.sample(uuids, sample)
    mismatches = 0
    late: list[str] = []  # 5xx answers, though every service has been back for a while
    todo = iter(uuids)

    async def fetch() -> None:
        nonlocal mismatches
        async with new_client(target.base_url) as client:
            for uuid in todo:
                response = await _get_retrying(client, f"/workflow/{uuid}/csv", late)
                digest = hashlib.sha256(response.content).hexdigest()
                if expected[uuid] is None:  # pruned
                    if response.status_code != 404:
                        mismatches += 1
                        outcome.notes.append(f"{uuid}: pruned, GET csv {response.status_code}")
                elif response.status_code != 200 or digest != expected[uuid]:
                    mismatches += 1
                    outcome.notes.append(f"{uuid}: GET csv {response.status_code} differs")

    await asyncio.gather(*(fetch() for _ in range(8)))
    outcome.counts["csv_checked"] = len(uuids)
    outcome.counts["late_5xx"] = len(late)
    if late:
        outcome.notes.append(f"5xx after the drain, retried (first 3): {late[:3]}")
    return mismatches


async def _get_retrying(client: httpx.AsyncClient, path: str, late: list[str]) -> httpx.Response:
    """GET, retried (as Retry-After invites) after a 5xx or a connection error, 3 tries."""
    for attempt in range(3):
        try:
            response = await client.get(path)
        except httpx.TransportError as error:
            if attempt == 2:
                raise
            late.append(f"{path}: {type(error).__name__}")
        else:
            if response.status_code < 500 or attempt == 2:
                return response
            late.append(f"{path}: {response.status_code} {response.text[:160]}")
        await asyncio.sleep(1)
    raise AssertionError("unreachable")
