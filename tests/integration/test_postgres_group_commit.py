"""Concurrent adds on PostgreSQL: grouped into shared statements, each row exact, a row the
database refuses fails alone."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import psycopg
import pytest

from workflows.adapters.grouping import Outgoing
from workflows.adapters.postgres import PostgresDatabase, PostgresOutbox, PostgresWorkflowRepository
from workflows.domain.ids import uuid7
from workflows.domain.model import JsonDocument, Workflow

pytestmark = pytest.mark.postgres

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
AWKWARD_STEPS = ("plain", 'a "quoted" step', "back\\slash", "{braces},commas", "NULL", " ", "ü✓")


def make(n: int, steps: tuple[str, ...] = AWKWARD_STEPS) -> Workflow:
    return Workflow.new(uuid7(), JsonDocument(f'{{"n":{n},"x":[1.50,"é"]}}'), steps, T0)


@pytest.mark.parametrize("outbox", [False, True])
async def test_concurrent_adds_store_every_row_exactly(pg: PostgresDatabase, outbox: bool) -> None:
    repository = PostgresWorkflowRepository(pg.pool, outbox=outbox)
    workflows = [make(n, AWKWARD_STEPS[: n % 8]) for n in range(300)]
    await asyncio.gather(*(repository.add(w) for w in workflows))
    for workflow in workflows:
        assert await repository.get(workflow.uuid) == workflow
    if outbox:
        assert await PostgresOutbox(pg.pool).size() == len(workflows)


async def test_concurrent_adds_share_statements(
    pg: PostgresDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    repository = PostgresWorkflowRepository(pg.pool, outbox=False)
    statements: list[int] = []
    write_many = repository._group._write_many

    async def counted(outgoing: Outgoing[Workflow]) -> None:
        await write_many(outgoing)
        statements.append(len(outgoing.taken or ()))

    monkeypatch.setattr(repository._group, "_write_many", counted)
    await asyncio.gather(*(repository.add(make(n)) for n in range(200)))
    assert sum(statements) == 200
    assert len(statements) < 20, f"{len(statements)} statements for 200 concurrent adds"


@pytest.mark.parametrize("outbox", [False, True])
async def test_a_row_the_database_refuses_fails_alone(pg: PostgresDatabase, outbox: bool) -> None:
    repository = PostgresWorkflowRepository(pg.pool, outbox=outbox)
    good = [make(n) for n in range(20)]
    # json accepts \u0000; the jsonb column derived from it refuses it.
    bad = Workflow.new(uuid7(), JsonDocument('{"nul":"\\u0000"}'), (), T0)
    results = await asyncio.gather(
        *(repository.add(w) for w in [*good[:10], bad, *good[10:]]), return_exceptions=True
    )
    assert isinstance(results[10], psycopg.DataError)
    assert [r for i, r in enumerate(results) if i != 10] == good
    assert await repository.get(bad.uuid) is None
    for workflow in good:
        assert await repository.get(workflow.uuid) == workflow
    if outbox:
        assert await PostgresOutbox(pg.pool).size() == len(good)
