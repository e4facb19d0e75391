"""Workflows in PostgreSQL: the repository (the queue on its rows is queue.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import LiteralString
from uuid import UUID

from psycopg import AsyncCursor, sql
from psycopg.rows import TupleRow

from workflows.adapters.grouping import Outgoing
from workflows.adapters.postgres.batching import Claim, GroupClaim, GroupRead
from workflows.adapters.postgres.claims import take_these
from workflows.adapters.postgres.database import (
    VERIFY_WITHIN,
    Connection,
    Pool,
    cancelled_by_server,
    connection,
    ping_database,
    rows_left_by,
    transaction,
)
from workflows.adapters.postgres.group_commit import GroupCommit
from workflows.adapters.postgres.rows import COLUMNS, QUEUED, as_workflow
from workflows.application.ports import ClaimHandler, StatusChange, WorkflowRepository
from workflows.domain.errors import DependencyUnavailable, IdempotencyKeyReused
from workflows.domain.model import IdempotencyKey, Workflow, WorkflowStatus, steps_size

log = logging.getLogger(__name__)

# How many of the uuids are stored, and whether the server process that ran their insert
# still runs (a process id can be reused after a restart: then we wait for nothing).
STORED = """
SELECT (SELECT count(*) FROM workflows WHERE uuid = ANY(%s::uuid[])),
       EXISTS (SELECT FROM pg_stat_activity WHERE pid = %s)
"""

INSERT = """
INSERT INTO workflows
    (uuid, status, data_text, data_size, steps, steps_size, created_at, updated_at)
VALUES (
    %(uuid)s, %(status)s, %(data)s, %(data_size)s, %(steps)s, %(steps_size)s, %(created_at)s,
    %(updated_at)s
)
"""
# One statement, so the workflow and its outbox entry commit together or not at all.
INSERT_WITH_OUTBOX = f"""
WITH added AS ({INSERT} RETURNING uuid)
INSERT INTO outbox (workflow_uuid) SELECT uuid FROM added
"""
INSERT_OUTBOX = "INSERT INTO outbox (workflow_uuid) VALUES (%s)"
# Many rows in one statement (GroupCommit): one array per column, steps as text[] literals.
INSERT_MANY = """
INSERT INTO workflows
    (uuid, status, data_text, data_size, steps, steps_size, created_at, updated_at)
SELECT uuid, status::workflow_status, data::json, octet_length(data), steps::text[],
       steps_size, created_at, updated_at
FROM unnest(
    %b::uuid[], %b::text[], %b::text[], %b::text[], %b::int4[], %b::timestamptz[],
    %b::timestamptz[]
) AS new (uuid, status, data, steps, steps_size, created_at, updated_at)
"""
INSERT_MANY_WITH_OUTBOX = f"""
WITH added AS ({INSERT_MANY} RETURNING uuid)
INSERT INTO outbox (workflow_uuid) SELECT uuid FROM added
"""

# Takes the key, or takes it over when it has expired; returns nothing (after waiting for
# a concurrent holder to commit) when someone else holds it.
TAKE_KEY = """
INSERT INTO idempotency_keys AS held (key, fingerprint, workflow_uuid, expires_at)
VALUES (%s, %s, %s, %s)
ON CONFLICT (key) DO UPDATE
SET fingerprint = EXCLUDED.fingerprint,
    workflow_uuid = EXCLUDED.workflow_uuid,
    expires_at = EXCLUDED.expires_at
WHERE held.expires_at <= %s
RETURNING key
"""
HELD_KEY = "SELECT fingerprint, workflow_uuid FROM idempotency_keys WHERE key = %s"
PURGE_KEYS = "DELETE FROM idempotency_keys WHERE expires_at <= %s"

GET = f"SELECT {COLUMNS} FROM workflows WHERE uuid = %s"
GET_MANY = f"SELECT {COLUMNS} FROM workflows WHERE uuid = ANY(%b::uuid[])"
# A PATCH locks its row only to change it (a status it does not have, or a dead letter's
# revival or retirement): a PATCH that changed nothing locked it all the same, and a consume
# at that moment (SKIP LOCKED) passed over a queued workflow: a 204 with it queued, or a
# newer one taken first. After waiting for another's lock, PostgreSQL checks the condition
# again on the row as that transaction left it (READ COMMITTED).
LOCK_TO_CHANGE = f"{GET} AND (status <> %s OR dead_lettered_at IS NOT NULL) FOR UPDATE"
# At start-up (ExportFlusher), on workflows_consumed_idx.
CONSUMED_SINCE = "SELECT uuid FROM workflows WHERE status = 'consumed' AND updated_at >= %s"
# `workflows prune`: consumed before a time (on workflows_consumed_idx), the oldest first,
# not named by an idempotency key in force (idempotency_keys_workflow_uuid_idx), not held by
# another transaction; deleted by primary key (a join there may scan the table).
PRUNABLE = """
FROM workflows w
WHERE status = 'consumed' AND updated_at < %(before)s
  AND NOT EXISTS (
      SELECT FROM idempotency_keys k WHERE k.workflow_uuid = w.uuid AND k.expires_at > %(now)s
  )
"""
PRUNE = f"""
WITH doomed AS (
    SELECT uuid {PRUNABLE} ORDER BY updated_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED
)
DELETE FROM workflows WHERE uuid = ANY(ARRAY(SELECT uuid FROM doomed)) RETURNING uuid
"""
COUNT_PRUNABLE = f"SELECT count(*) {PRUNABLE}"
SET_STATE = f"""
UPDATE workflows
SET status = %s, updated_at = %s, delivery_attempts = %s, dead_lettered_at = %s
WHERE uuid = %s
RETURNING {COLUMNS}
"""
RECORD_FAILURE = f"""
UPDATE workflows
SET delivery_attempts = delivery_attempts + 1,
    dead_lettered_at = CASE WHEN delivery_attempts + 1 >= %(max)s THEN %(now)s END,
    updated_at = %(now)s
WHERE uuid = %(uuid)s AND {QUEUED}
RETURNING {COLUMNS}
"""

LIST = sql.SQL("SELECT {} FROM workflows WHERE {} ORDER BY uuid LIMIT %(limit)s")
# With a size budget, up to two statements. First LIST, but with the text of a document
# over `small` (the budget over the limit) left NULL: when there is none, no page of these
# rows can pass the budget, and that is the answer (nearly every page; it costs PostgreSQL
# ~3 % more than LIST, where a running sum over the rows costs ~25 %). Sizes come from
# data_size (migration 0008), written by each insert as JsonDocument.size (in a UTF8 or
# SQL_ASCII database octet_length counts the same bytes); a row stored before it has
# none, and counts as large.
# Steps count too (steps_size, migration 0010; NULL, so large, for an older row): a page of
# 134 rows of {"a":1} with 1 MiB of steps each was 3 GB of a worker's memory.
SMALL_COLUMNS = COLUMNS.replace(
    "data_text::text",
    "CASE WHEN data_size + steps_size <= %(small)s THEN data_text::text END",
)
# Else the same rows, ending at the first one whose predecessors hold `max_bytes` of data
# (itself included): `before_last` is the data of the rows before the previous one (NULL
# for the first two). A size missing from data_size is read from the text, which fetches
# the document.
LIST_WITHIN = sql.SQL(
    """
SELECT {} FROM (
    SELECT uuid, status, data_text, steps, created_at, updated_at, delivery_attempts,
           dead_lettered_at,
           sum(
               coalesce(data_size, octet_length(data_text::text))
               + coalesce(steps_size, (
                   SELECT coalesce(sum(octet_length(step) + 3), 0) FROM unnest(steps) step
               ))
           ) OVER (
               ORDER BY uuid ROWS BETWEEN UNBOUNDED PRECEDING AND 2 PRECEDING
           ) AS before_last
    FROM workflows WHERE {}
    ORDER BY uuid LIMIT %(limit)s
) page
WHERE before_last IS NULL OR before_last < %(max_bytes)s
ORDER BY uuid
"""
)
STATUS_IS = sql.SQL("status = %(status)s")
DEAD = sql.SQL("dead_lettered_at IS NOT NULL")
ALIVE = sql.SQL("dead_lettered_at IS NULL")
AFTER = sql.SQL("uuid > %(after)s")


class PostgresWorkflowRepository(WorkflowRepository):
    """With `outbox`, every write that queues a workflow also writes its outbox entry.
    `returned(n)` hears of rows queued again because their claims' callers left."""

    def __init__(
        self, pool: Pool, *, outbox: bool, returned: Callable[[int], None] | None = None
    ) -> None:
        self._pool = pool
        self._outbox = outbox
        self._insert_many = INSERT_MANY_WITH_OUTBOX if outbox else INSERT_MANY
        # Adds without an idempotency key (nearly all) commit in groups: under load that
        # is one round trip and one WAL flush for many POSTs instead of one each.
        # Each POST waits for its row to go at most the pool's timeout in all, batch ahead
        # included: its 503 comes after the one timeout, not two.
        self._group: GroupCommit[Workflow] = GroupCommit(self._add_many, within=pool.timeout)
        # Concurrent GETs share a statement too, and wait as long in all.
        self._reads = GroupRead(self._get_many, within=pool.timeout)
        self._claims = GroupClaim(pool, take_these, linger=0, begin_first=True, returned=returned)

    async def add(self, workflow: Workflow, idempotency: IdempotencyKey | None = None) -> Workflow:
        if idempotency is None:
            await self._group.add(workflow)
            return workflow
        row = {
            "uuid": workflow.uuid,
            "status": workflow.status.value,
            "data": workflow.data.text,
            "data_size": workflow.data.size,
            "steps": list(workflow.steps),
            "steps_size": steps_size(workflow.steps),
            "created_at": workflow.created_at,
            "updated_at": workflow.updated_at,
        }
        insert = INSERT_WITH_OUTBOX if self._outbox else INSERT
        async with transaction(self._pool) as conn:
            key = (idempotency.key, idempotency.fingerprint, workflow.uuid)
            taken = await conn.execute(
                TAKE_KEY, (*key, idempotency.expires_at, workflow.created_at)
            )
            if await taken.fetchone() is not None:
                await conn.execute(insert, row)
                return workflow
            held = await (await conn.execute(HELD_KEY, (idempotency.key,))).fetchone()
            assert held is not None, "TAKE_KEY returns nothing only when the key is held"
            fingerprint, owner = held
            if fingerprint != idempotency.fingerprint:
                raise IdempotencyKeyReused(idempotency.key)
            return await _one(await conn.execute(GET, (owner,)))

    async def _add_many(self, outgoing: Outgoing[Workflow]) -> None:
        sent_by: int | None = None
        uuids: list[UUID] = []
        try:
            async with connection(self._pool, wait=outgoing.wait) as conn:
                # Only now: a row whose caller's deadline passed meanwhile is left out.
                if not (workflows := outgoing.take()):
                    return
                columns = (
                    uuids := [w.uuid for w in workflows],
                    [w.status.value for w in workflows],
                    [w.data.text for w in workflows],
                    [_text_array(w.steps) for w in workflows],
                    [steps_size(w.steps) for w in workflows],
                    [w.created_at for w in workflows],
                    [w.updated_at for w in workflows],
                )
                sent_by = conn.info.backend_pid
                await conn.execute(self._insert_many, columns)
        except DependencyUnavailable as error:
            # The statement may have gone out and committed, its answer lost with the
            # connection (a server that dies between its commit and its reply). Rather
            # than answer 503 for stored workflows, which a client would then POST again,
            # look: the statement is atomic, so all of them are stored or none.
            if sent_by is None or cancelled_by_server(error):
                raise
            if not await self._all_stored(uuids, sent_by):
                raise

    async def _all_stored(self, uuids: list[UUID], sent_by: int) -> bool:
        """Whether every one of `uuids` is stored. None stored is an answer only once the
        server process that ran the statement (`sent_by`) is gone: until then it may
        still commit. False too when the database cannot say within VERIFY_WITHIN seconds."""
        stored = await rows_left_by(self._pool, STORED, (uuids, sent_by), within=VERIFY_WITHIN)
        if stored:
            log.warning("a lost answer: %d of %d new workflows were stored", stored, len(uuids))
        return stored == len(uuids)

    async def purge_expired_keys(self, now: datetime) -> int:
        async with connection(self._pool) as conn:
            return (await conn.execute(PURGE_KEYS, (now,))).rowcount

    async def get(self, uuid: UUID) -> Workflow | None:
        return await self._reads.submit(uuid)

    async def consumed_since(self, since: datetime) -> list[UUID]:
        async with connection(self._pool) as conn:
            rows = await (await conn.execute(CONSUMED_SINCE, (since,))).fetchall()
        return [row[0] for row in rows]

    async def _get_many(self, outgoing: Outgoing[UUID]) -> dict[UUID, Workflow]:
        async with connection(self._pool, wait=outgoing.wait) as conn:
            # Only now: a read whose caller's deadline passed meanwhile is left out.
            if not (uuids := list(dict.fromkeys(outgoing.take()))):
                return {}
            rows = await (await conn.execute(GET_MANY, (uuids,))).fetchall()
        return {workflow.uuid: workflow for workflow in map(as_workflow, rows)}

    async def prune_consumed(self, before: datetime, now: datetime, limit: int) -> list[UUID]:
        params = {"before": before, "now": now, "limit": limit}
        async with connection(self._pool) as conn:
            rows = await (await conn.execute(PRUNE, params)).fetchall()
        return [row[0] for row in rows]

    async def count_prunable(self, before: datetime, now: datetime) -> int:
        async with connection(self._pool) as conn:
            row = await (
                await conn.execute(COUNT_PRUNABLE, {"before": before, "now": now})
            ).fetchone()
        assert row is not None, "count(*) returns a row"
        return int(row[0])

    async def list(
        self,
        *,
        status: WorkflowStatus | None,
        after: UUID | None,
        limit: int,
        dead_lettered: bool | None = None,
        max_bytes: int | None = None,
    ) -> list[Workflow]:
        filters = [STATUS_IS] if status is not None else []
        if after is not None:
            filters.append(AFTER)
        if dead_lettered is not None:
            filters.append(DEAD if dead_lettered else ALIVE)
        where = sql.SQL(" AND ").join(filters or [sql.SQL("TRUE")])
        params = {
            "status": None if status is None else status.value,
            "after": after,
            "limit": limit,
            "max_bytes": max_bytes,
            "small": None if max_bytes is None else max_bytes // max(limit, 1),
        }
        columns = sql.SQL(COLUMNS if max_bytes is None else SMALL_COLUMNS)
        async with connection(self._pool) as conn:
            # Binary results: a page's uuids, timestamps and arrays load faster that way.
            rows = await (
                await conn.execute(LIST.format(columns, where), params, binary=True)
            ).fetchall()
            if any(row[2] is None for row in rows):  # a large document's text: count them all
                query = LIST_WITHIN.format(sql.SQL(COLUMNS), where)
                rows = await (await conn.execute(query, params, binary=True)).fetchall()
        return [as_workflow(row) for row in rows]

    async def set_status(
        self, uuid: UUID, status: WorkflowStatus, now: datetime
    ) -> StatusChange | None:
        async with transaction(self._pool) as conn:
            while (row := await _one_or_none(conn, LOCK_TO_CHANGE, (uuid, status.value))) is None:
                # Nothing to change, or no such workflow: read as it is, unlocked; unless
                # another transaction changed it in between, then lock it to change it.
                if (row := await _one_or_none(conn, GET, (uuid,))) is None:
                    return None
                current = as_workflow(row)
                if current.status is status and current.dead_lettered_at is None:
                    return StatusChange(current, changed=False)
            current = as_workflow(row)
            changed = await _set_state(conn, current.with_status(status, now))
            if self._outbox and status is WorkflowStatus.INSERTED:
                await conn.execute(INSERT_OUTBOX, (uuid,))
        return StatusChange(changed, changed=True)

    async def record_failure(self, uuid: UUID, now: datetime, max_attempts: int) -> Workflow | None:
        params = {"uuid": uuid, "now": now, "max": max_attempts}
        async with connection(self._pool) as conn:
            row = await (await conn.execute(RECORD_FAILURE, params)).fetchone()
        return None if row is None else as_workflow(row)

    async def claim(self, uuid: UUID, handle: ClaimHandler, now: datetime) -> Workflow | None:
        return await self._claims.call(Claim(uuid, handle, now))

    async def ping(self) -> None:
        await ping_database(self._pool, schema=True)


async def _set_state(conn: Connection, workflow: Workflow) -> Workflow:
    params = (
        workflow.status.value,
        workflow.updated_at,
        workflow.delivery_attempts,
        workflow.dead_lettered_at,
        workflow.uuid,
    )
    return await _one(await conn.execute(SET_STATE, params))


async def _one_or_none(
    conn: Connection, query: LiteralString, params: Sequence[object]
) -> TupleRow | None:
    return await (await conn.execute(query, params)).fetchone()


async def _one(cursor: AsyncCursor[TupleRow]) -> Workflow:
    row = await cursor.fetchone()
    assert row is not None, "the statement returns the row it locked"
    return as_workflow(row)


def _text_array(items: Sequence[str]) -> str:
    """A text[] literal: every element double-quoted, with \\ and " escaped."""
    quoted = ('"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"' for item in items)
    return "{" + ",".join(quoted) + "}"
