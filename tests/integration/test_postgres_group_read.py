"""Concurrent reads by uuid on PostgreSQL: grouped into shared statements, each caller gets
its own row (or None), and a read never misses a write committed before it was asked for."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from uuid import UUID

import pytest

from workflows.adapters.grouping import Outgoing
from workflows.adapters.postgres import PostgresDatabase, PostgresWorkflowRepository
from workflows.domain.ids import uuid7
from workflows.domain.model import JsonDocument, Workflow

pytestmark = pytest.mark.postgres

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def make(n: int) -> Workflow:
    return Workflow.new(uuid7(), JsonDocument(f'{{"n":{n}}}'), (f"step {n}",), T0)


async def test_concurrent_reads_share_statements_and_each_gets_its_own_row(
    pg: PostgresDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    repository = PostgresWorkflowRepository(pg.pool, outbox=False)
    stored = [make(n) for n in range(100)]
    await asyncio.gather(*(repository.add(w) for w in stored))
    statements: list[int] = []
    read_many = repository._reads._read_many

    async def counted(outgoing: Outgoing[UUID]) -> dict[UUID, Workflow]:
        found = await read_many(outgoing)
        assert outgoing.taken is not None
        statements.append(len({uuid for (uuid, _), _ in outgoing.taken}))  # uuids read
        return found

    monkeypatch.setattr(repository._reads, "_read_many", counted)
    unknown = [uuid7() for _ in range(20)]
    asked = [w.uuid for w in stored] + unknown + [stored[0].uuid, stored[0].uuid]
    got = await asyncio.gather(*(repository.get(uuid) for uuid in asked))
    assert got == [*stored, *[None] * 20, stored[0], stored[0]]
    assert sum(statements) < len(asked), "a uuid asked twice in a batch is read once"
    assert len(statements) < 10, f"{len(statements)} statements for {len(asked)} reads"


async def test_a_read_asked_during_a_batch_sees_a_write_committed_before_it_was_asked(
    pg: PostgresDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second read queues behind a batch in flight; the row commits in between; the
    second read's own statement starts later and finds it."""
    repository = PostgresWorkflowRepository(pg.pool, outbox=False)
    repository._reads._parallel = 1
    first_running, release = asyncio.Event(), asyncio.Event()
    read_many = repository._reads._read_many

    async def slow_first(outgoing: Outgoing[UUID]) -> dict[UUID, Workflow]:
        if not first_running.is_set():
            found = await read_many(outgoing)
            first_running.set()  # its statement has run: the batch is still in flight
            await release.wait()
            return found
        return await read_many(outgoing)

    monkeypatch.setattr(repository._reads, "_read_many", slow_first)
    late = make(1)
    first = asyncio.create_task(repository.get(late.uuid))
    await first_running.wait()
    await repository.add(late)  # committed before the second read is asked for
    second = asyncio.create_task(repository.get(late.uuid))
    await asyncio.sleep(0.05)
    release.set()
    assert await first is None  # its statement ran before the commit
    assert await second == late
