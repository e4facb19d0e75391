"""What the PostgreSQL repository and queue promise beyond the contract suites."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import psycopg
import pytest
from psycopg import sql
from psycopg.abc import Params

from workflows.adapters.postgres import (
    PostgresDatabase,
    PostgresQueue,
    PostgresWorkflowRepository,
)
from workflows.adapters.postgres.claims import TAKE_OLDEST_INSERTED
from workflows.adapters.postgres.rows import COLUMNS
from workflows.adapters.postgres.workflows import LIST_WITHIN, PRUNE
from workflows.domain.ids import uuid7
from workflows.domain.model import IdempotencyKey, JsonDocument, Workflow, WorkflowStatus

pytestmark = pytest.mark.postgres

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
HOUR = timedelta(hours=1)


def make() -> Workflow:
    return Workflow.new(uuid7(), JsonDocument('{"a":1}'), ("s",), T0)


@pytest.fixture
async def kolkata(pg: PostgresDatabase, database_url: str) -> AsyncIterator[PostgresDatabase]:
    """A second pool on the same (emptied) schema whose sessions use Asia/Kolkata time."""
    url = psycopg.conninfo.make_conninfo(database_url, options="-c TimeZone=Asia/Kolkata")
    database = PostgresDatabase(url)
    await database.start()
    yield database
    await database.stop()


async def test_timestamps_read_back_in_utc_whatever_the_session_time_zone(
    kolkata: PostgresDatabase,
) -> None:
    repository = PostgresWorkflowRepository(kolkata.pool, outbox=False)
    workflow = make()
    await repository.add(workflow)
    stored = await repository.get(workflow.uuid)
    assert stored == workflow
    assert stored.created_at.tzinfo is UTC
    assert stored.updated_at.tzinfo is UTC


async def test_sessions_use_utc_unless_the_url_sets_a_time_zone(
    pg: PostgresDatabase, kolkata: PostgresDatabase
) -> None:
    for database, zone in ((pg, "UTC"), (kolkata, "Asia/Kolkata")):
        async with database.pool.connection() as conn:
            shown = await (await conn.execute("SHOW TimeZone")).fetchone()
            now = await (await conn.execute("SELECT now()")).fetchone()
        assert shown == (zone,)
        assert now is not None
        assert (now[0].tzinfo is UTC) is (zone == "UTC")  # timezone.utc, not a zoneinfo zone


async def test_list_combines_status_filter_and_cursor(pg: PostgresDatabase) -> None:
    repository = PostgresWorkflowRepository(pg.pool, outbox=False)
    workflows = [make() for _ in range(4)]
    for workflow in workflows:
        await repository.add(workflow)
    await repository.set_status(workflows[2].uuid, WorkflowStatus.CONSUMED, T0)
    page = await repository.list(status=WorkflowStatus.INSERTED, after=workflows[0].uuid, limit=2)
    assert [w.uuid for w in page] == [workflows[1].uuid, workflows[3].uuid]


async def test_list_within_max_bytes_counts_documents_by_their_text_not_their_storage(
    pg: PostgresDatabase,
) -> None:
    """Documents of 200,000 bytes that PostgreSQL compresses to a few kB: the budget is
    about what the page will hold in memory, their text."""
    repository = PostgresWorkflowRepository(pg.pool, outbox=False)
    workflows = [
        Workflow.new(uuid7(), JsonDocument('{"p":"' + "x" * (200_000 - 8) + '"}'), ("s",), T0)
        for _ in range(6)
    ]
    for workflow in workflows:
        await repository.add(workflow)
    async with pg.pool.connection() as conn:
        cursor = await conn.execute("SELECT max(pg_column_size(data_text)) FROM workflows")
        assert (stored := await cursor.fetchone()) is not None
        assert stored[0] < 20_000
    found = await repository.list(status=None, after=None, limit=100, max_bytes=500_000)
    # Before each: 0, 200,000, 400,000, then 600,000: that one ends the list.
    assert found == workflows[:4]
    # Rows stored before migration 0008 have no data_size: their text is measured.
    async with pg.pool.connection() as conn:
        await conn.execute("UPDATE workflows SET data_size = NULL, steps_size = NULL")
    assert await repository.list(status=None, after=None, limit=100, max_bytes=500_000) == found


async def test_every_insert_records_the_size_of_the_document_text(pg: PostgresDatabase) -> None:
    repository = PostgresWorkflowRepository(pg.pool, outbox=True)
    texts = ['{"a":1}', '{"é":"☃ 𝄞","n":[1,2.50]}']
    grouped = [Workflow.new(uuid7(), JsonDocument(text), ("s",), T0) for text in texts]
    keyed = [Workflow.new(uuid7(), JsonDocument(text), ("s",), T0) for text in texts]
    await asyncio.gather(*(repository.add(w) for w in grouped))  # one statement for all
    for workflow in keyed:  # one statement each, with its key
        await repository.add(workflow, IdempotencyKey(str(workflow.uuid), "f", T0 + HOUR))
    async with pg.pool.connection() as conn:
        cursor = await conn.execute("SELECT uuid, data_size FROM workflows")
        sizes: dict[UUID, int] = dict(await cursor.fetchall())
    assert sizes == {w.uuid: len(w.data.text.encode()) for w in grouped + keyed}
    # é, ☃ and 𝄞 are 2, 3 and 4 bytes long
    assert [w.data.size for w in grouped] == [7, len(texts[1]) + 1 + 2 + 3]


async def plan_among_many(
    pg: PostgresDatabase, status: str, explain: str | sql.Composed, params: Params
) -> str:
    """The plan `explain` (an EXPLAIN statement) prints among 20,000 analysed rows of
    `status`."""
    async with pg.pool.connection() as conn:
        await conn.execute(
            "INSERT INTO workflows (uuid, status, data_text, created_at, updated_at)"
            " SELECT gen_random_uuid(), %s, '{}', now(), now()"
            " FROM generate_series(1, 20000)",
            (status,),
        )
        await conn.execute("ANALYZE workflows")
        cursor = await conn.execute(explain, params)
        return "\n".join(line for (line,) in await cursor.fetchall())


async def test_list_within_max_bytes_reads_the_index_and_stops_at_the_limit(
    pg: PostgresDatabase,
) -> None:
    where = sql.SQL("status = %(status)s AND uuid > %(after)s")
    query = LIST_WITHIN.format(sql.SQL(COLUMNS), where)
    params = {"status": "inserted", "after": uuid4(), "limit": 101, "max_bytes": 1 << 23}
    explain = sql.SQL("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) ") + query
    plan = await plan_among_many(pg, "inserted", explain, params)
    assert "Seq Scan" not in plan, plan
    assert "Sort" not in plan, plan
    assert "Index Scan using workflows_status_uuid_idx" in plan, plan
    # The scan stopped at the limit (the window reads one row ahead), not at the table's end.
    scanned = re.search(r"Index Scan using workflows_status_uuid_idx.*\(actual rows=(\d+) ", plan)
    assert scanned is not None, plan
    assert int(scanned[1]) <= 102, plan


async def test_claim_by_uuid_and_queue_consume_race_for_one_workflow_exactly_once(
    pg: PostgresDatabase,
) -> None:
    repository, queue = PostgresWorkflowRepository(pg.pool, outbox=False), PostgresQueue(pg.pool)
    workflow = make()
    await repository.add(workflow)
    calls: list[Workflow] = []

    async def slow(w: Workflow) -> None:
        calls.append(w)
        await asyncio.sleep(0.05)

    results = await asyncio.gather(
        *(repository.claim(workflow.uuid, slow, T0) for _ in range(3)),
        *(queue.consume(slow, T0) for _ in range(3)),
    )
    assert len(calls) == 1
    assert [r.uuid for r in results if r is not None] == [workflow.uuid]


async def test_consume_finds_the_oldest_inserted_row_by_index_among_many_consumed(
    pg: PostgresDatabase,
) -> None:
    plan = await plan_among_many(
        pg, "consumed", f"EXPLAIN {TAKE_OLDEST_INSERTED}", (T0, uuid4(), 1)
    )
    # Either index reaches the INSERTED rows directly; neither scans the consumed ones.
    # (Which one the planner takes depends on its statistics.)
    assert "Seq Scan" not in plan, plan
    assert "workflows_queue_idx" in plan or "workflows_status_uuid_idx" in plan, plan


async def test_prune_leaves_a_row_another_transaction_holds_for_a_later_call(
    pg: PostgresDatabase,
) -> None:
    repository = PostgresWorkflowRepository(pg.pool, outbox=False)
    held, free = make(), make()
    for workflow in (held, free):
        await repository.add(workflow)
        await repository.set_status(workflow.uuid, WorkflowStatus.CONSUMED, T0)
    before, now = T0 + HOUR, T0 + 48 * HOUR
    async with pg.pool.connection() as other, other.transaction():  # a PATCH under way, say
        await other.execute("SELECT FROM workflows WHERE uuid = %s FOR UPDATE", (held.uuid,))
        pruned = await asyncio.wait_for(repository.prune_consumed(before, now, limit=10), 5)
        assert pruned == [free.uuid]
    assert await repository.prune_consumed(before, now, limit=10) == [held.uuid]


async def test_prune_reads_indexes_only_and_stops_at_its_batch(pg: PostgresDatabase) -> None:
    async with pg.pool.connection() as conn:
        # 20,000 consumed a second apart, every one older than the prune's time, and 5,000
        # idempotency keys in force (naming other workflows).
        await conn.execute(
            "INSERT INTO workflows (uuid, status, data_text, created_at, updated_at)"
            " SELECT gen_random_uuid(), 'consumed', '{}', t, t FROM ("
            "   SELECT now() - i * interval '1 second' AS t FROM generate_series(1, 20000) i"
            " ) times"
        )
        await conn.execute(
            "INSERT INTO idempotency_keys (key, fingerprint, workflow_uuid, expires_at)"
            " SELECT 'k' || i, 'f', gen_random_uuid(), now() + interval '1 day'"
            " FROM generate_series(1, 5000) i"
        )
        await conn.execute("ANALYZE workflows")
        await conn.execute("ANALYZE idempotency_keys")
        params = {"before": datetime.now(UTC) + HOUR, "now": datetime.now(UTC), "limit": 1000}
        cursor = await conn.execute(f"EXPLAIN {PRUNE}", params)
        plan = "\n".join(line for (line,) in await cursor.fetchall())
    assert "Seq Scan" not in plan, plan
    assert "Sort" not in plan, plan
    assert "Index Scan using workflows_consumed_idx" in plan, plan
    assert "idempotency_keys_workflow_uuid_idx" in plan, plan


async def test_a_replay_racing_a_prune_either_wins_whole_or_finds_the_workflow_gone(
    pg: PostgresDatabase,
) -> None:
    """PATCH to inserted (a replay) and `workflows prune` at once, on the same old consumed
    workflows: the prune from the longest consumed, the replays from the other end, one
    statement at a time each, so that they meet. A replay that succeeded leaves a queued
    workflow no prune deletes; a workflow the prune deleted was never replayed (its PATCH
    found nothing: 404)."""
    repository = PostgresWorkflowRepository(pg.pool, outbox=False)
    workflows = [make() for _ in range(200)]
    for n, workflow in enumerate(workflows):
        await repository.add(workflow)
        consumed_at = T0 + timedelta(seconds=n)  # the prune's order: this list's
        await repository.set_status(workflow.uuid, WorkflowStatus.CONSUMED, consumed_at)
    before, now = T0 + HOUR, T0 + 48 * HOUR
    pruned: list[UUID] = []
    replays: list[tuple[UUID, bool]] = []

    async def prune() -> None:
        while batch := await repository.prune_consumed(before, now, limit=5):
            pruned.extend(batch)

    async def replay() -> None:
        # Dated before the prune's time: only the status keeps a replayed row from it.
        for workflow in reversed(workflows):
            change = await repository.set_status(workflow.uuid, WorkflowStatus.INSERTED, T0)
            replays.append((workflow.uuid, change is not None))

    await asyncio.gather(replay(), prune())
    replayed = {uuid for uuid, found in replays if found}
    gone = {uuid for uuid, found in replays if not found}
    assert replayed.isdisjoint(pruned)
    assert gone == set(pruned)
    assert gone, "the replays found every workflow: no race was run"
    assert replayed, "the prune took every workflow: no race was run"
    for uuid in replayed:
        stored = await repository.get(uuid)
        assert stored is not None
        assert stored.status is WorkflowStatus.INSERTED


async def test_a_patch_that_changes_nothing_takes_no_lock_and_a_change_waits_for_one(
    pg: PostgresDatabase,
) -> None:
    """A PATCH to the status a workflow has locked its row all the same: a consume at that
    moment passed over it (SKIP LOCKED), a 204 with it queued. Here another session holds a
    share lock on the row, as a lock no PATCH may take while it is held: the PATCH that
    changes nothing answers at once; the one that changes the status waits for it."""
    repository, queue = PostgresWorkflowRepository(pg.pool, outbox=False), PostgresQueue(pg.pool)
    workflow = make()
    await repository.add(workflow)
    async with pg.pool.connection() as other, other.transaction():
        await other.execute("SELECT FROM workflows WHERE uuid = %s FOR SHARE", (workflow.uuid,))
        unchanged = await asyncio.wait_for(
            repository.set_status(workflow.uuid, WorkflowStatus.INSERTED, T0 + HOUR), 2
        )
        assert unchanged is not None
        assert not unchanged.changed
        assert unchanged.workflow == workflow
        change = asyncio.create_task(
            repository.set_status(workflow.uuid, WorkflowStatus.CONSUMED, T0 + HOUR)
        )
        await asyncio.sleep(0.3)
        assert not change.done()  # waits for the share lock
    changed = await asyncio.wait_for(change, 5)
    assert changed is not None
    assert changed.changed
    assert changed.workflow.status is WorkflowStatus.CONSUMED
    assert await queue.consume(lambda w: asyncio.sleep(0), T0) is None


async def test_a_patch_that_changes_nothing_does_not_hide_its_workflow_from_a_consume(
    pg: PostgresDatabase,
) -> None:
    """The audit's race, many times over: a PATCH to `inserted` of the one queued workflow
    beside a consume; the consume takes it every time. (A PATCH that comes after the
    consume's commit replays the workflow: each round ends by taking it out of play.)"""
    repository, queue = PostgresWorkflowRepository(pg.pool, outbox=False), PostgresQueue(pg.pool)
    taken = []
    for _ in range(40):
        workflow = make()
        await repository.add(workflow)
        _, consumed = await asyncio.gather(
            repository.set_status(workflow.uuid, WorkflowStatus.INSERTED, T0 + HOUR),
            queue.consume(lambda w: asyncio.sleep(0), T0 + HOUR),
        )
        taken.append(None if consumed is None else consumed.uuid == workflow.uuid)
        await repository.set_status(workflow.uuid, WorkflowStatus.CONSUMED, T0 + HOUR)
    assert taken == [True] * 40
