"""The outbox on a real PostgreSQL: written with its workflow, claimed, kept or deleted."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
import pytest

from workflows.adapters.postgres import (
    PostgresDatabase,
    PostgresOutbox,
    PostgresWorkflowRepository,
)
from workflows.application.ports import OutboxEntry
from workflows.domain.ids import uuid7
from workflows.domain.model import JsonDocument, Workflow, WorkflowStatus

pytestmark = pytest.mark.postgres


def make() -> Workflow:
    return Workflow.new(uuid7(), JsonDocument('{"a":1}'), ("s",), datetime.now(UTC))


async def age_all_entries(pg: PostgresDatabase) -> None:
    async with pg.pool.connection() as conn:
        await conn.execute("UPDATE outbox SET created_at = now() - interval '1 hour'")


async def test_add_writes_one_outbox_entry_with_the_workflow(pg: PostgresDatabase) -> None:
    repository, outbox = PostgresWorkflowRepository(pg.pool, outbox=True), PostgresOutbox(pg.pool)
    workflow = make()
    await repository.add(workflow)
    assert await outbox.size() == 1
    async with outbox.claim([workflow.uuid], stale_after=60, limit=10) as entries:
        assert [entry.workflow_uuid for entry in entries] == [workflow.uuid]


async def test_repository_without_outbox_writes_no_entries(pg: PostgresDatabase) -> None:
    repository = PostgresWorkflowRepository(pg.pool, outbox=False)
    workflow = make()
    await repository.add(workflow)
    await repository.set_status(workflow.uuid, WorkflowStatus.CONSUMED, datetime.now(UTC))
    await repository.set_status(workflow.uuid, WorkflowStatus.INSERTED, datetime.now(UTC))
    assert await PostgresOutbox(pg.pool).size() == 0


async def test_failed_add_leaves_no_outbox_entry(pg: PostgresDatabase) -> None:
    repository, outbox = PostgresWorkflowRepository(pg.pool, outbox=True), PostgresOutbox(pg.pool)
    workflow = make()
    await repository.add(workflow)
    with pytest.raises(psycopg.errors.UniqueViolation):
        await repository.add(workflow)
    assert await outbox.size() == 1


async def test_only_a_change_to_inserted_writes_an_outbox_entry(pg: PostgresDatabase) -> None:
    repository, outbox = PostgresWorkflowRepository(pg.pool, outbox=True), PostgresOutbox(pg.pool)
    workflow = make()
    await repository.add(workflow)
    async with outbox.claim([workflow.uuid], stale_after=60, limit=10):
        pass
    assert await outbox.size() == 0

    await repository.set_status(workflow.uuid, WorkflowStatus.INSERTED, datetime.now(UTC))
    assert await outbox.size() == 0
    await repository.set_status(workflow.uuid, WorkflowStatus.CONSUMED, datetime.now(UTC))
    assert await outbox.size() == 0
    await repository.set_status(workflow.uuid, WorkflowStatus.INSERTED, datetime.now(UTC))
    assert await outbox.size() == 1


async def test_claim_takes_the_named_entries_and_leaving_deletes_them(
    pg: PostgresDatabase,
) -> None:
    repository, outbox = PostgresWorkflowRepository(pg.pool, outbox=True), PostgresOutbox(pg.pool)
    named, other = make(), make()
    await repository.add(named)
    await repository.add(other)
    async with outbox.claim([named.uuid], stale_after=60, limit=10) as entries:
        assert [entry.workflow_uuid for entry in entries] == [named.uuid]
    assert await outbox.size() == 1
    async with outbox.claim([named.uuid], stale_after=60, limit=10) as entries:
        assert entries == []


async def test_claim_takes_stale_entries_oldest_first_up_to_the_limit(
    pg: PostgresDatabase,
) -> None:
    repository, outbox = PostgresWorkflowRepository(pg.pool, outbox=True), PostgresOutbox(pg.pool)
    workflows = [make() for _ in range(3)]
    for workflow in workflows:
        await repository.add(workflow)
    async with outbox.claim([], stale_after=60, limit=10) as entries:
        assert entries == []
    await age_all_entries(pg)
    async with outbox.claim([], stale_after=60, limit=2) as entries:
        assert [entry.workflow_uuid for entry in entries] == [w.uuid for w in workflows[:2]]
    assert await outbox.size() == 1


async def test_claim_keeps_the_entries_when_the_block_raises(pg: PostgresDatabase) -> None:
    repository, outbox = PostgresWorkflowRepository(pg.pool, outbox=True), PostgresOutbox(pg.pool)
    workflow = make()
    await repository.add(workflow)
    claimed: list[OutboxEntry] = []

    async def publish_fails() -> None:
        async with outbox.claim([workflow.uuid], stale_after=60, limit=10) as entries:
            claimed.extend(entries)
            raise RuntimeError("broker down")

    with pytest.raises(RuntimeError, match="broker down"):
        await publish_fails()
    assert [entry.workflow_uuid for entry in claimed] == [workflow.uuid]
    assert await outbox.size() == 1
    async with outbox.claim([workflow.uuid], stale_after=60, limit=10) as entries:
        assert [entry.workflow_uuid for entry in entries] == [workflow.uuid]


async def test_concurrent_claims_skip_the_entries_another_holds(pg: PostgresDatabase) -> None:
    repository, outbox = PostgresWorkflowRepository(pg.pool, outbox=True), PostgresOutbox(pg.pool)
    first, second = make(), make()
    await repository.add(first)
    await repository.add(second)
    await age_all_entries(pg)
    async with (
        outbox.claim([], stale_after=60, limit=1) as held,
        outbox.claim([first.uuid], stale_after=60, limit=10) as rest,
    ):
        assert [entry.workflow_uuid for entry in held] == [first.uuid]
        assert [entry.workflow_uuid for entry in rest] == [second.uuid]
    assert await outbox.size() == 0


async def test_delete_removes_the_entries_of_the_named_workflows_only(
    pg: PostgresDatabase,
) -> None:
    repository, outbox = PostgresWorkflowRepository(pg.pool, outbox=True), PostgresOutbox(pg.pool)
    named, other = make(), make()
    await repository.add(named)
    await repository.add(other)
    await outbox.delete([named.uuid])
    await age_all_entries(pg)
    async with outbox.claim([], stale_after=60, limit=10) as entries:
        assert [entry.workflow_uuid for entry in entries] == [other.uuid]
    await outbox.delete([named.uuid])  # nothing left to delete: no error
    assert await outbox.size() == 0


async def test_discard_unqueued_deletes_the_entries_of_workflows_no_longer_queued(
    pg: PostgresDatabase,
) -> None:
    repository, outbox = PostgresWorkflowRepository(pg.pool, outbox=True), PostgresOutbox(pg.pool)
    queued, consumed, dead, not_named, held = (make() for _ in range(5))
    for workflow in (queued, consumed, dead, not_named, held):
        await repository.add(workflow)
    at = datetime.now(UTC)
    for workflow in (consumed, not_named, held):
        await repository.set_status(workflow.uuid, WorkflowStatus.CONSUMED, at)
    await repository.record_failure(dead.uuid, at, max_attempts=1)
    named = [queued.uuid, consumed.uuid, dead.uuid, held.uuid]
    async with outbox.claim([held.uuid], stale_after=60, limit=10):  # a sweep holds it
        assert await outbox.discard_unqueued(named) == {consumed.uuid, dead.uuid}
    async with outbox.claim([], stale_after=0, limit=10) as left:
        assert sorted(entry.workflow_uuid for entry in left) == sorted(
            [queued.uuid, not_named.uuid]
        )


async def test_discard_unqueued_keeps_a_replayed_workflow_s_entry(pg: PostgresDatabase) -> None:
    repository, outbox = PostgresWorkflowRepository(pg.pool, outbox=True), PostgresOutbox(pg.pool)
    workflow = make()
    await repository.add(workflow)
    await repository.set_status(workflow.uuid, WorkflowStatus.CONSUMED, datetime.now(UTC))
    await repository.set_status(workflow.uuid, WorkflowStatus.INSERTED, datetime.now(UTC))
    assert await outbox.size() == 2  # the first message's entry and the replay's
    assert await outbox.discard_unqueued([workflow.uuid]) == set()  # queued again
    assert await outbox.size() == 2
