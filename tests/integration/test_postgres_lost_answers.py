"""A connection that dies while a statement is on its way: before the server got it, or after
the server committed it and before its answer arrived. The group insert (POST) tells the
two apart by asking the database, instead of answering 503 for work that was done."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from uuid import UUID

import psycopg
import pytest

from tests.support.tcp_proxy import TcpProxy
from workflows.adapters.grouping import Outgoing
from workflows.adapters.postgres import (
    PostgresDatabase,
    PostgresQueue,
    PostgresWorkflowRepository,
)
from workflows.adapters.postgres import workflows as workflows_module
from workflows.domain.errors import DependencyUnavailable
from workflows.domain.ids import uuid7
from workflows.domain.model import JsonDocument, Workflow, WorkflowStatus

pytestmark = pytest.mark.postgres

NOW = datetime.now(UTC)
ANSWER_OF_AN_INSERT = b"INSERT 0 "  # the CommandComplete tag: "INSERT 0 <rows>"
AN_INSERT_OF_WORKFLOWS = b"INSERT INTO workflows"


@pytest.fixture
async def relay(database_url: str) -> AsyncIterator[TcpProxy]:
    """The test database behind a relay that a test can set to cut a connection."""
    proxy = TcpProxy.to_postgres(database_url)
    await proxy.up()
    yield proxy
    await proxy.down()


@pytest.fixture
async def through(relay: TcpProxy) -> AsyncIterator[PostgresDatabase]:
    """A started pool, through the relay, on an empty schema."""
    database = PostgresDatabase(relay.url, min_size=1)
    await database.start()
    async with database.pool.connection() as conn:
        await conn.execute("TRUNCATE workflows, outbox, idempotency_keys")
    yield database
    await database.stop()


def new_workflows(n: int) -> list[Workflow]:
    return [Workflow.new(uuid7(), JsonDocument(f'{{"n":{i}}}'), ("s",), NOW) for i in range(n)]


async def add_many(repository: PostgresWorkflowRepository, workflows: list[Workflow]) -> None:
    """The group insert of `workflows` as one batch, with no deadline."""
    loop = asyncio.get_running_loop()
    await repository._add_many(Outgoing([((w, math.inf), loop.create_future()) for w in workflows]))


async def stored(database_url: str, workflows: list[Workflow]) -> int:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cursor = await conn.execute(
            "SELECT count(*) FROM workflows WHERE uuid = ANY(%s)", ([w.uuid for w in workflows],)
        )
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize("outbox", [False, True], ids=["postgres", "outbox"])
async def test_a_group_insert_whose_answer_is_lost_after_its_commit_succeeds(
    relay: TcpProxy, through: PostgresDatabase, database_url: str, outbox: bool
) -> None:
    repository = PostgresWorkflowRepository(through.pool, outbox=outbox)
    workflows = new_workflows(3)
    relay.trap("to_client", ANSWER_OF_AN_INSERT)

    await add_many(repository, workflows)

    assert relay.sprung == 1, "the answer was cut"
    assert await stored(database_url, workflows) == 3
    for workflow in workflows:
        assert await repository.get(workflow.uuid) == workflow


async def test_a_group_insert_that_never_reached_the_server_still_fails(
    relay: TcpProxy, through: PostgresDatabase, database_url: str
) -> None:
    repository = PostgresWorkflowRepository(through.pool, outbox=False)
    workflows = new_workflows(2)
    relay.trap("to_server", AN_INSERT_OF_WORKFLOWS)

    with pytest.raises(DependencyUnavailable):
        await add_many(repository, workflows)

    assert relay.sprung == 1
    assert await stored(database_url, workflows) == 0


async def test_a_lost_answer_stays_a_503_while_the_database_cannot_say(
    relay: TcpProxy,
    through: PostgresDatabase,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(workflows_module, "VERIFY_WITHIN", 0.5)
    repository = PostgresWorkflowRepository(through.pool, outbox=False)
    workflows = new_workflows(2)
    relay.trap("to_client", ANSWER_OF_AN_INSERT)
    ask = repository._all_stored

    async def asked_while_the_database_is_away(uuids: list[UUID], sent_by: int) -> bool:
        await relay.down()
        return await ask(uuids, sent_by)

    monkeypatch.setattr(repository, "_all_stored", asked_while_the_database_is_away)
    started = time.monotonic()
    with pytest.raises(DependencyUnavailable):
        await add_many(repository, workflows)
    assert time.monotonic() - started < 3, "asked for VERIFY_WITHIN, not the pool's 5 s"
    assert await stored(database_url, workflows) == 2, "stored: the 503 means 'not known'"


async def test_an_insert_still_running_when_its_connection_died_is_waited_for(
    relay: TcpProxy, through: PostgresDatabase, database_url: str
) -> None:
    """The server has the statement but has not run it yet (it waits for a lock) when the
    connection goes: finding nothing stored is no answer while its server process lives."""
    repository = PostgresWorkflowRepository(through.pool, outbox=False)
    workflows = new_workflows(2)
    async with await psycopg.AsyncConnection.connect(database_url) as holder:
        await holder.execute("BEGIN")
        await holder.execute("LOCK TABLE workflows IN SHARE ROW EXCLUSIVE MODE")
        adding = asyncio.create_task(add_many(repository, workflows))
        async with asyncio.timeout(5):
            while not await waiting_for_a_lock(holder):  # noqa: ASYNC110 (polls the server)
                await asyncio.sleep(0.02)
        await relay.cut()  # its server process keeps waiting: it reads nothing meanwhile
        await asyncio.sleep(0.5)
        assert not adding.done(), "still asking, as the insert has not finished"
        await holder.execute("COMMIT")
        await adding  # stored: no 503
    assert await stored(database_url, workflows) == 2


async def waiting_for_a_lock(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> bool:
    # `conn` is inside a transaction, which would see the activity of its first look again
    # and again (the server caches it for the transaction): drop that snapshot every time.
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    cursor = await conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND query LIKE '%INSERT INTO workflows%'"
    )
    row = await cursor.fetchone()
    return row is not None and int(str(row[0])) > 0


async def test_add_answers_every_caller_of_a_batch_whose_answer_was_lost(
    relay: TcpProxy, through: PostgresDatabase, database_url: str
) -> None:
    repository = PostgresWorkflowRepository(through.pool, outbox=True)
    workflow = new_workflows(1)[0]
    relay.trap("to_client", ANSWER_OF_AN_INSERT)

    assert await repository.add(workflow) == workflow

    assert relay.sprung == 1
    assert await stored(database_url, [workflow]) == 1


# --- consume: a claim whose COMMIT goes unanswered ---------------------------------------
# The claim's rows carry its token only if it committed. (`txid_status` of the claim's
# transaction could not tell: after a crash PostgreSQL may give a lost transaction's id to
# a new one, and the chaos suite caught a check built on it handing out workflows twice.)

ANSWER_OF_A_COMMIT = b"COMMIT\x00"  # the CommandComplete tag of COMMIT


async def one_queued(database: PostgresDatabase) -> tuple[PostgresQueue, Workflow]:
    """The postgres backend's queue, holding one new workflow."""
    workflow = new_workflows(1)[0]
    await PostgresWorkflowRepository(database.pool, outbox=False).add(workflow)
    return PostgresQueue(database.pool), workflow


async def test_a_claim_whose_commit_answer_is_lost_hands_out_its_workflow(
    relay: TcpProxy, through: PostgresDatabase, database_url: str
) -> None:
    queue, workflow = await one_queued(through)
    handled: list[Workflow] = []

    async def handle(taken: Workflow) -> None:
        handled.append(taken)

    relay.trap("to_client", ANSWER_OF_A_COMMIT)
    consumed = await queue.consume(handle, NOW)

    assert relay.sprung == 1, "the COMMIT's answer was cut"
    assert consumed is not None
    assert consumed.uuid == workflow.uuid
    assert consumed.status is WorkflowStatus.CONSUMED
    assert handled == [workflow]
    assert await status_of(database_url, workflow) == "consumed"
    assert await queue.consume(handle, NOW) is None, "and it is not handed out again"


async def test_a_claim_by_uuid_whose_commit_answer_is_lost_hands_out_its_workflow(
    relay: TcpProxy, through: PostgresDatabase, database_url: str
) -> None:
    """The rabbitmq backend's claim (of the workflow its message names)."""
    repository = PostgresWorkflowRepository(through.pool, outbox=True)
    workflow = new_workflows(1)[0]
    await repository.add(workflow)

    async def handle(taken: Workflow) -> None:
        pass

    relay.trap("to_client", ANSWER_OF_A_COMMIT)
    claimed = await repository.claim(workflow.uuid, handle, NOW)

    assert relay.sprung == 1
    assert claimed is not None
    assert claimed.uuid == workflow.uuid
    assert await status_of(database_url, workflow) == "consumed"


async def test_a_claim_rolled_back_by_its_server_is_not_taken_for_committed(
    relay: TcpProxy, through: PostgresDatabase, database_url: str
) -> None:
    """The COMMIT reaches a server that cannot commit (the claim's transaction was
    already aborted there, as a crash would leave it): no row carries the token."""
    queue, workflow = await one_queued(through)

    async def handle(taken: Workflow) -> None:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as admin:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND state = 'idle in transaction'"
            )

    with pytest.raises(DependencyUnavailable):
        await queue.consume(handle, NOW)

    assert await status_of(database_url, workflow) == "inserted"
    again = await queue.consume(handle_nothing, NOW)
    assert again is not None
    assert again.uuid == workflow.uuid


async def handle_nothing(taken: Workflow) -> None:
    pass


async def test_a_claim_whose_commit_never_arrived_fails_and_leaves_its_workflow_queued(
    relay: TcpProxy, through: PostgresDatabase, database_url: str
) -> None:
    queue, workflow = await one_queued(through)

    async def handle(taken: Workflow) -> None:
        pass

    relay.trap("to_server", b"COMMIT")
    with pytest.raises(DependencyUnavailable):
        await queue.consume(handle, NOW)

    assert relay.sprung == 1
    assert await status_of(database_url, workflow) == "inserted"
    again = await queue.consume(handle, NOW)
    assert again is not None
    assert again.uuid == workflow.uuid


async def status_of(database_url: str, workflow: Workflow) -> str:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cursor = await conn.execute(
            "SELECT status::text FROM workflows WHERE uuid = %s", (workflow.uuid,)
        )
        row = await cursor.fetchone()
    assert row is not None
    return str(row[0])
