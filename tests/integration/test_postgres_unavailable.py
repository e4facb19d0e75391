"""The database going away: every adapter reports DependencyUnavailable (the HTTP layer's
503), and the pool recovers on its own once the database is back."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
import pytest

from tests.support.sockets import keepalive_options
from tests.support.tcp_proxy import TcpProxy
from workflows.adapters.postgres import (
    PostgresDatabase,
    PostgresOutbox,
    PostgresQueue,
    PostgresWorkflowRepository,
    migrate,
)
from workflows.adapters.postgres import batching as batching_module
from workflows.adapters.postgres import database as database_module
from workflows.adapters.postgres import workflows as workflows_module
from workflows.adapters.postgres.database import closed_by_server
from workflows.adapters.postgres.stats import PostgresStats
from workflows.domain.errors import DependencyUnavailable
from workflows.domain.ids import uuid7
from workflows.domain.model import JsonDocument, Workflow, WorkflowStatus

T = TypeVar("T")

pytestmark = pytest.mark.postgres


async def eventually(call: Callable[[], Awaitable[object]], *, within: float) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            await call()
            return
        except DependencyUnavailable:
            if asyncio.get_running_loop().time() > deadline:
                raise


@pytest.fixture
async def outage(database_url: str) -> AsyncIterator[TcpProxy]:
    """The test database behind a relay, initially down."""
    outage = TcpProxy.to_postgres(database_url)
    yield outage
    await outage.down()


@pytest.fixture
def impatient(monkeypatch: pytest.MonkeyPatch) -> None:
    """Callers give up waiting for a connection after 0.3 s, not 5 s."""
    monkeypatch.setattr(database_module, "ACQUIRE_TIMEOUT", 0.3)


async def never_called(workflow: Workflow) -> None:
    raise AssertionError("the handler must not run when the database is down")


async def claim_outbox(outbox: PostgresOutbox) -> None:
    async with outbox.claim([uuid7()], stale_after=1.0, limit=10):
        pass


NOW = datetime.now(UTC)
NEW = Workflow.new(uuid7(), JsonDocument("{}"), (), NOW)
CALLS: dict[
    str,
    Callable[[PostgresWorkflowRepository, PostgresQueue, PostgresOutbox], Awaitable[object]],
] = {
    "repository.add": lambda r, q, o: r.add(NEW),
    "repository.get": lambda r, q, o: r.get(NEW.uuid),
    "repository.list": lambda r, q, o: r.list(status=None, after=None, limit=10),
    "repository.set_status": lambda r, q, o: r.set_status(NEW.uuid, WorkflowStatus.CONSUMED, NOW),
    "repository.claim": lambda r, q, o: r.claim(NEW.uuid, never_called, NOW),
    "repository.ping": lambda r, q, o: r.ping(),
    "queue.consume": lambda r, q, o: q.consume(never_called, NOW),
    "queue.ping": lambda r, q, o: q.ping(),
    "outbox.claim": lambda r, q, o: claim_outbox(o),
    "outbox.size": lambda r, q, o: o.size(),
}


@pytest.mark.usefixtures("impatient")
async def test_start_raises_dependency_unavailable_while_the_database_is_down(
    outage: TcpProxy,
) -> None:
    database = PostgresDatabase(outage.url)
    with pytest.raises(DependencyUnavailable) as caught:
        await database.start()
    assert caught.value.dependency == "database"
    await database.stop()


@pytest.mark.usefixtures("impatient")
@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
async def test_every_adapter_method_raises_dependency_unavailable_while_the_database_is_down(
    outage: TcpProxy,
    call: Callable[[PostgresWorkflowRepository, PostgresQueue, PostgresOutbox], Awaitable[object]],
) -> None:
    database = PostgresDatabase(outage.url)
    await database.start(wait=False)
    pool = database.pool
    try:
        with pytest.raises(DependencyUnavailable) as caught:
            await call(
                PostgresWorkflowRepository(pool, outbox=True),
                PostgresQueue(pool),
                PostgresOutbox(pool),
            )
        assert caught.value.dependency == "database"
    finally:
        await database.stop()


LOCKED_OUT = {name: call for name, call in CALLS.items() if not name.endswith(".ping")}


@pytest.mark.parametrize("call", LOCKED_OUT.values(), ids=LOCKED_OUT.keys())
async def test_a_call_held_up_by_another_sessions_lock_gets_its_503_at_the_lock_timeout(
    pg: PostgresDatabase,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    call: Callable[[PostgresWorkflowRepository, PostgresQueue, PostgresOutbox], Awaitable[object]],
) -> None:
    """Another session holds the tables (an operator's `ALTER TABLE` or `LOCK`): a call
    fails when the lock timeout is up, not when the lock goes; a write the server
    cancelled is known not stored, so it does not ask for a lost answer first; nothing
    changes."""
    monkeypatch.setattr(database_module, "LOCK_TIMEOUT", 0.5)
    database = PostgresDatabase(database_url)
    await database.start()
    pool = database.pool
    loop = asyncio.get_running_loop()
    try:
        async with await psycopg.AsyncConnection.connect(database_url) as holder:
            await holder.execute(
                "LOCK TABLE workflows, outbox, idempotency_keys IN ACCESS EXCLUSIVE MODE"
            )
            repositories = (
                PostgresWorkflowRepository(pool, outbox=True),
                PostgresQueue(pool),
                PostgresOutbox(pool),
            )
            began = loop.time()
            with pytest.raises(DependencyUnavailable) as caught:
                await asyncio.wait_for(call(*repositories), 10)
            waited = loop.time() - began
            await holder.rollback()
        assert caught.value.dependency == "database"
        assert 0.5 <= waited < 2.0, f"the 503 came after {waited:.2f} s"
    finally:
        await database.stop()
    assert await PostgresWorkflowRepository(pg.pool, outbox=True).get(NEW.uuid) is None
    assert await PostgresOutbox(pg.pool).size() == 0


@pytest.mark.usefixtures("impatient")
@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
async def test_a_call_to_a_database_that_stops_answering_gets_its_503_at_the_query_timeout(
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    call: Callable[[PostgresWorkflowRepository, PostgresQueue, PostgresOutbox], Awaitable[object]],
) -> None:
    """The server stops answering but keeps its connections open (hung, frozen, SIGSTOP,
    a network that drops packets; here a relay that holds every byte): a call fails when
    its round trip has waited the query timeout (a write, after asking what it left for
    as long as it may), where it waited for as long as the server did; its connection is
    closed, and once the server answers again the same pool serves."""
    monkeypatch.setattr(database_module, "QUERY_TIMEOUT", 0.5)
    for module in (workflows_module, batching_module):  # a write asks what it left
        monkeypatch.setattr(module, "VERIFY_WITHIN", 0.5)
    proxy = TcpProxy.to_postgres(database_url)
    await proxy.up()
    database = PostgresDatabase(proxy.url)
    await database.start()
    pool = database.pool
    repositories = (
        PostgresWorkflowRepository(pool, outbox=True),
        PostgresQueue(pool),
        PostgresOutbox(pool),
    )
    loop = asyncio.get_running_loop()
    try:
        proxy.stall()
        began = loop.time()
        with pytest.raises(DependencyUnavailable) as caught:
            await asyncio.wait_for(call(*repositories), 10)
        waited = loop.time() - began
        assert caught.value.dependency == "database"
        assert 0.5 <= waited < 2.5, f"the 503 came after {waited:.2f} s"
        proxy.flow()
        await eventually(repositories[0].ping, within=database_module.RECONNECT_TIMEOUT)
    finally:
        proxy.flow()
        await database.stop()
        await proxy.down()


@pytest.mark.parametrize("ping", ["repository", "queue"])
async def test_a_probe_of_a_database_that_stops_answering_answers_within_the_acquire_timeout(
    database_url: str, monkeypatch: pytest.MonkeyPatch, ping: str
) -> None:
    """/readyz's database check gives its verdict within the one timeout (here 1.5 s),
    connection included, not the query timeout a statement gets (10 s)."""
    monkeypatch.setattr(database_module, "ACQUIRE_TIMEOUT", 1.5)
    proxy = TcpProxy.to_postgres(database_url)
    await proxy.up()
    database = PostgresDatabase(proxy.url)
    await database.start()
    probe = {
        "repository": PostgresWorkflowRepository(database.pool, outbox=False).ping,
        "queue": PostgresQueue(database.pool).ping,
    }[ping]
    loop = asyncio.get_running_loop()
    try:
        proxy.stall()
        began = loop.time()
        with pytest.raises(DependencyUnavailable):
            await asyncio.wait_for(probe(), 10)
        waited = loop.time() - began
        assert 1.5 <= waited < 2.5, f"the verdict came after {waited:.2f} s"
        proxy.flow()
        await eventually(probe, within=database_module.RECONNECT_TIMEOUT)
    finally:
        proxy.flow()
        await database.stop()
        await proxy.down()


async def test_the_clis_full_scan_waits_past_the_query_timeout_and_the_next_statement_not(
    pg: PostgresDatabase, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`workflows stats` counts by status with a full scan, which takes as long as the
    table is big: it is not cut off at the query timeout (here 0.2 s, the server held
    for 1 s); the next statement on the same connection has its deadline again."""
    monkeypatch.setattr(database_module, "QUERY_TIMEOUT", 0.2)
    proxy = TcpProxy.to_postgres(database_url)
    await proxy.up()
    database = PostgresDatabase(proxy.url, max_size=1)  # one connection, used by both
    await database.start()
    stats = PostgresStats(database.pool)
    try:
        proxy.stall()
        counting = asyncio.create_task(stats.counts_by_status())
        await asyncio.sleep(1.0)
        assert not counting.done()
        proxy.flow()
        assert await asyncio.wait_for(counting, 5) == {}  # `pg` emptied the tables
        proxy.stall()
        with pytest.raises(DependencyUnavailable, match="no answer"):
            await asyncio.wait_for(stats.queue_depth(), 5)
    finally:
        proxy.flow()
        await database.stop()
        await proxy.down()


async def test_asking_what_a_lost_write_left_takes_at_most_its_time_on_a_hung_server(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a write whose answer was lost left is asked for at most `within` (0.3 s),
    the question's own round trip on an idle connection of a server that hangs included,
    not a whole query timeout (2 s)."""
    monkeypatch.setattr(database_module, "QUERY_TIMEOUT", 2.0)
    proxy = TcpProxy.to_postgres(database_url)
    await proxy.up()
    database = PostgresDatabase(proxy.url, min_size=1)
    await database.start()  # one idle connection, taken by the question
    loop = asyncio.get_running_loop()
    try:
        proxy.stall()
        began = loop.time()
        with pytest.raises(DependencyUnavailable):
            await asyncio.wait_for(
                database_module.ask_patiently(database.pool, "SELECT 1", (), within=0.3), 10
            )
        waited = loop.time() - began
        assert waited < 1.0, f"the question took {waited:.2f} s"
    finally:
        proxy.flow()
        await database.stop()
        await proxy.down()


def tcp_keepalive(conn: psycopg.AsyncConnection[Any]) -> tuple[int, int, int, int]:
    """The keepalive options of `conn`'s own socket."""
    with socket.fromfd(conn.pgconn.socket, socket.AF_INET, socket.SOCK_STREAM) as sock:
        return keepalive_options(sock)


@pytest.mark.parametrize(
    ("given", "expected"),
    [("", (1, 30, 10, 3)), ("keepalives_idle=5", (1, 5, 10, 3))],
    ids=["ours", "the URL's idle"],
)
async def test_pooled_connections_probe_their_idle_peer_with_tcp_keepalives(
    database_url: str, given: str, expected: tuple[int, int, int, int]
) -> None:
    """An idle pooled connection is probed after 30 s (NAT state kept, a dead peer found
    within 60 s), on the socket itself, unless the URL says otherwise."""
    proxy = TcpProxy.to_postgres(database_url)  # over TCP, whatever DATABASE_URL uses
    await proxy.up()
    url = f"{proxy.url} {given}" if given else proxy.url
    database = PostgresDatabase(url)
    await database.start()
    try:
        async with database.pool.connection() as conn:
            assert tcp_keepalive(conn) == expected
    finally:
        await database.stop()
        await proxy.down()


def test_migrate_raises_dependency_unavailable_while_the_database_is_down(
    outage: TcpProxy,
) -> None:
    with pytest.raises(DependencyUnavailable):
        migrate(outage.url)


@pytest.mark.usefixtures("impatient")
async def test_service_started_while_the_database_is_down_recovers_when_it_returns(
    outage: TcpProxy,
) -> None:
    database = PostgresDatabase(outage.url)
    await database.start(wait=False)
    repository = PostgresWorkflowRepository(database.pool, outbox=False)
    try:
        with pytest.raises(DependencyUnavailable):
            await repository.ping()
        await outage.up()
        await eventually(repository.ping, within=database_module.RECONNECT_TIMEOUT)
        assert await repository.get(uuid7()) is None
    finally:
        await database.stop()


async def test_a_restart_while_the_pool_is_idle_fails_no_call(outage: TcpProxy) -> None:
    await outage.up()
    database = PostgresDatabase(outage.url, min_size=3)
    await database.start()
    await database.pool.wait(timeout=5)  # three idle connections, all about to die
    repository = PostgresWorkflowRepository(database.pool, outbox=False)
    try:
        await outage.cut()
        # The server's side is closed: the sockets say so (soon; a loaded machine is slow).
        deadline = asyncio.get_running_loop().time() + 5
        while (stale := sum(map(closed_by_server, list(database.pool._pool)))) < 3:
            assert asyncio.get_running_loop().time() < deadline, f"{stale} of 3 show it"
            await asyncio.sleep(0.02)
        assert await repository.set_status(uuid7(), WorkflowStatus.CONSUMED, NOW) is None
        assert await repository.get(uuid7()) is None
        workflow = Workflow.new(uuid7(), JsonDocument('{"a":1}'), ("s",), NOW)
        await repository.add(workflow)
        assert await repository.get(workflow.uuid) == workflow
    finally:
        await database.stop()


async def test_a_connection_lost_in_use_fails_its_call_and_the_next_one_reconnects(
    outage: TcpProxy,
) -> None:
    await outage.up()
    database = PostgresDatabase(outage.url, min_size=2)
    await database.start()
    repository = PostgresWorkflowRepository(database.pool, outbox=False)
    try:
        async with database.pool.connection() as conn:  # in use when the server goes
            await outage.cut()
            with pytest.raises(psycopg.OperationalError):
                await conn.execute("SELECT 1")
        with contextlib.suppress(DependencyUnavailable):  # a sibling may die mid-call
            await repository.get(uuid7())
        assert await repository.get(uuid7()) is None
    finally:
        await database.stop()


async def test_a_live_idle_connection_is_not_taken_for_a_closed_one(database_url: str) -> None:
    database = PostgresDatabase(database_url, min_size=1)
    await database.start()
    try:
        async with database.pool.connection() as conn:
            await conn.execute("SELECT 1")
            assert not closed_by_server(conn)
    finally:
        await database.stop()


async def behind_a_held_connection(
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    call: Callable[[PostgresWorkflowRepository, int], Coroutine[Any, Any, T]],
    *,
    ahead: int,
    outbox: bool,
) -> T:
    """The pool's only connection is held (max_connections used up looks the same) and
    callers wait for one at most 2 s: `ahead` calls (`call(repository, 0)` …) in the first
    0.4 s, then call number `ahead`, behind their batches, must get its 503 within 2.5 s,
    when its own timeout is up, not after a batch's timeout and then a whole one of its own
    (it was 1.6 + 2 s). The connection comes back at 3.0 s, in time for the call made at
    1.8 s (number `ahead` + 1): its result."""
    monkeypatch.setattr(database_module, "ACQUIRE_TIMEOUT", 2.0)
    database = PostgresDatabase(database_url, min_size=1, max_size=1)
    await database.start()
    repository = PostgresWorkflowRepository(database.pool, outbox=outbox)
    loop = asyncio.get_running_loop()
    try:
        held = await database.pool.getconn()
        try:
            began = loop.time()
            first: list[asyncio.Task[T]] = []
            for number in range(ahead):
                first.append(asyncio.create_task(call(repository, number)))
                await asyncio.sleep(0.4 / ahead)
            started = loop.time()
            behind = asyncio.create_task(call(repository, ahead))  # due at 2.4 s
            await asyncio.sleep(1.4)
            later = asyncio.create_task(call(repository, ahead + 1))  # due at 3.8 s
            for waiting in (*first, behind):
                with pytest.raises(DependencyUnavailable):
                    await waiting
            waited = loop.time() - started
            assert waited < 2.5, f"the 503 came after {waited:.2f} s"
            await asyncio.sleep(began + 3.0 - loop.time())
        finally:
            await database.pool.putconn(held)
        return await asyncio.wait_for(later, 5)
    finally:
        await database.stop()


async def test_a_post_behind_a_batch_waiting_for_a_connection_gets_its_503_in_one_timeout(
    pg: PostgresDatabase, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A POST behind a group-commit batch waiting for a connection: its 503 in its own
    timeout; a connection that comes later goes to the rows still wanted, so that 503
    stored nothing."""
    new = [Workflow.new(uuid7(), JsonDocument("{}"), (), NOW) for _ in range(3)]
    later = await behind_a_held_connection(
        database_url,
        monkeypatch,
        lambda repository, n: repository.add(new[n]),
        ahead=1,
        outbox=True,
    )
    assert later == new[2]
    repository = PostgresWorkflowRepository(pg.pool, outbox=True)
    assert [await repository.get(w.uuid) for w in new] == [None, None, new[2]]
    assert await PostgresOutbox(pg.pool).size() == 1


async def test_a_get_behind_batches_waiting_for_a_connection_gets_its_503_in_one_timeout(
    pg: PostgresDatabase, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GET behind both read batches waiting for a connection: its 503 in its own
    timeout; a read still waiting when a connection comes gets its answer."""
    stored = Workflow.new(uuid7(), JsonDocument("{}"), (), NOW)
    await PostgresWorkflowRepository(pg.pool, outbox=False).add(stored)
    later = await behind_a_held_connection(
        database_url,
        monkeypatch,
        lambda repository, _: repository.get(stored.uuid),
        ahead=2,
        outbox=False,
    )
    assert later == stored
