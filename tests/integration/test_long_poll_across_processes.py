"""Long-poll consume across API processes: a POST on one wakes a waiter on another
(PostgreSQL LISTEN/NOTIFY), on both real backends."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from tests.support.sockets import keepalive_options
from tests.support.tcp_proxy import TcpProxy
from workflows.adapters.postgres import PostgresDatabase
from workflows.adapters.postgres import database as database_module
from workflows.adapters.postgres import doorbell as doorbell_module
from workflows.adapters.postgres.doorbell import PostgresDoorbell
from workflows.entrypoints.config import Settings
from workflows.entrypoints.container import Container, running
from workflows.entrypoints.http import create_app


@pytest.fixture
async def two_processes(
    backend_settings: Settings,
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """Two containers on the same database and queue, as two API processes would be."""
    containers = [Container(settings=backend_settings) for _ in range(2)]
    async with running(containers[0]), running(containers[1]):
        for container in containers:  # only the doorbell may wake a waiter
            container.consume_workflow().recheck_every = 3600.0
        clients = [
            httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(c)), base_url="http://t")
            for c in containers
        ]
        async with clients[0], clients[1]:
            yield clients[0], clients[1]
        if backend_settings.queue_backend == "rabbitmq":
            await containers[0].broker().delete_queue()


async def test_post_on_one_process_wakes_a_waiter_on_another(
    two_processes: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    waiter_side, poster_side = two_processes
    waiting = asyncio.create_task(waiter_side.get("/workflow/consume?wait=15"))
    await asyncio.sleep(0.5)
    assert not waiting.done()
    uuid = (await poster_side.post("/workflow", json={"data": {"a": 1}})).json()["uuid"]
    response = await asyncio.wait_for(waiting, 10)
    assert response.status_code == 200
    assert response.headers["x-workflow-uuid"] == uuid


async def woken(doorbell: PostgresDoorbell, count: int) -> list[asyncio.Task[bool]]:
    waiters = []
    for _ in range(count):
        waiters.append(asyncio.create_task(doorbell.wait(doorbell.ticket(), 10.0)))
        await asyncio.sleep(0)
    return waiters


async def until_heard(
    ringing: PostgresDoorbell, listening: PostgresDoorbell, *, tries: int = 50
) -> None:
    """Ring until a waiter of `listening` wakes (every 0.1 s, `tries` times): its LISTEN is on."""
    (waiter,) = await woken(listening, 1)
    for _ in range(tries):
        ringing.ring()
        done, _ = await asyncio.wait([waiter], timeout=0.1)
        if done:
            return
    raise AssertionError("the other doorbell never heard a ring")


@pytest.mark.parametrize("backend_settings", ["postgres"], indirect=True)
async def test_a_notify_wakes_as_many_waiters_as_rang_for_and_never_its_sender(
    backend_settings: Settings,
) -> None:
    containers = [Container(settings=backend_settings) for _ in range(2)]
    async with running(containers[0]), running(containers[1]):
        ringing, other = (container.postgres_doorbell() for container in containers)
        await until_heard(ringing, other)
        await until_heard(other, ringing)
        await asyncio.sleep(0.2)  # every NOTIFY of the above has been heard
        here, there = await woken(ringing, 4), await woken(other, 4)
        ringing.ring(2)
        await asyncio.sleep(0.5)  # the NOTIFY reaches both listeners, the sender's too
        assert [w.done() for w in here] == [True, True, False, False]  # no echo
        assert [w.done() for w in there] == [True, True, False, False]


@asynccontextmanager
async def listening_behind_a_relay(
    database_url: str, pg: PostgresDatabase
) -> AsyncIterator[tuple[TcpProxy, PostgresDoorbell, PostgresDoorbell]]:
    """Two doorbells, the listening one's connection (alone) through a relay, once it
    hears the ringing one."""
    proxy = TcpProxy.to_postgres(database_url)
    await proxy.up()
    ringing = PostgresDoorbell(database_url, pg.pool)
    listening = PostgresDoorbell(proxy.url, pg.pool)
    await ringing.start()
    await listening.start()
    try:
        await until_heard(ringing, listening)
        yield proxy, ringing, listening
    finally:
        await listening.stop()
        await ringing.stop()
        await proxy.down()


async def test_a_listener_whose_connection_died_without_a_word_listens_again(
    database_url: str, pg: PostgresDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listening connection goes dead with neither end told (a NAT or firewall that
    forgot it): its heartbeat finds out within the heartbeat and the query timeout, and it
    listens on a new connection, where it would never have heard a NOTIFY again."""
    monkeypatch.setattr(doorbell_module, "HEARTBEAT", 0.5)
    monkeypatch.setattr(database_module, "QUERY_TIMEOUT", 0.5)
    async with listening_behind_a_relay(database_url, pg) as (proxy, ringing, listening):
        proxy.blackhole()
        await asyncio.sleep(1.5)  # a heartbeat, its timeout, a new connection
        for _ in range(2):  # the second waiter comes after the new connection's wake-up
            await until_heard(ringing, listening, tries=30)


def keepalives_to(port: int) -> list[tuple[int, int, int, int]]:
    """SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT of this process's TCP
    sockets connected to 127.0.0.1:`port`."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if not stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                continue  # fromfd would leak its duplicate of a descriptor it refuses
            sock = socket.fromfd(int(name), socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            continue
        with sock:
            try:
                if sock.type != socket.SOCK_STREAM or sock.getpeername() != ("127.0.0.1", port):
                    continue
                found.append(keepalive_options(sock))
            except OSError:
                continue
    return found


async def test_the_listening_connection_probes_its_idle_peer_with_tcp_keepalives(
    database_url: str, pg: PostgresDatabase
) -> None:
    """The listener sits idle between NOTIFYs: TCP keepalives after 30 s of silence keep
    NAT state along the way, as for the pool's connections."""
    async with listening_behind_a_relay(database_url, pg) as (proxy, _, _):
        assert keepalives_to(proxy.port) == [(1, 30, 10, 3)]
