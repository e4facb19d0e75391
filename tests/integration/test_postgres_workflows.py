"""What the PostgreSQL repository and queue promise beyond the contract suites."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from uuid import uuid4

import psycopg
import pytest

from workflows.adapters.postgres import (
    PostgresDatabase,
    PostgresQueue,
    PostgresWorkflowRepository,
)
from workflows.adapters.postgres.claims import TAKE_OLDEST_INSERTED
from workflows.domain.ids import uuid7
from workflows.domain.model import JsonDocument, Workflow, WorkflowStatus

pytestmark = pytest.mark.postgres

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


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
    async with pg.pool.connection() as conn:
        await conn.execute(
            "INSERT INTO workflows (uuid, status, data_text, created_at, updated_at)"
            " SELECT gen_random_uuid(), 'consumed', '{}', now(), now()"
            " FROM generate_series(1, 20000)"
        )
        await conn.execute("ANALYZE workflows")
        cursor = await conn.execute(f"EXPLAIN {TAKE_OLDEST_INSERTED}", (T0, uuid4(), 1))
        plan = "\n".join(line for (line,) in await cursor.fetchall())
    # Either index reaches the INSERTED rows directly; neither scans the consumed ones.
    # (Which one the planner takes depends on its statistics.)
    assert "Seq Scan" not in plan, plan
    assert "workflows_queue_idx" in plan or "workflows_status_uuid_idx" in plan, plan
