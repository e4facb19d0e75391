"""Graceful shutdown and reconnection, on the real services.

The database or the broker goes away under a running app (a TCP relay between them is
taken down) and comes back: meanwhile what needs the database answers 503 with
Retry-After and /readyz says not ready, while without the broker every request is still
served and /readyz says degraded; afterwards the same app, never restarted, serves again and
nothing was half-written or lost. Then real `workflows serve` processes: a rolling
restart of its two workers under load fails no request, and SIGTERM answers every
long-polling consumer at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TypeVar

import attrs
import httpx
import pika
import pytest

from tests.support.processes import running as running_process
from tests.support.tcp_proxy import TcpProxy, free_port
from workflows.adapters.postgres import PostgresDatabase
from workflows.adapters.postgres import batching as batching_module
from workflows.adapters.postgres import database as database_module
from workflows.adapters.postgres import workflows as workflows_module
from workflows.entrypoints.config import Settings
from workflows.entrypoints.container import Container, running
from workflows.entrypoints.http import create_app

pytestmark = pytest.mark.postgres

RECOVERY_DEADLINE = 60.0
"""Seconds a dependency's return may take to show; generous for a loaded 2-core machine."""
PROBLEM = "application/problem+json"
T = TypeVar("T")


# --- the app in-process, with one dependency behind a relay -------------------------


@asynccontextmanager
async def app_with(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app as tests/integration/conftest.py's `live` builds it, on `settings`."""
    container = Container(settings=settings)
    async with running(container):
        transport = httpx.ASGITransport(app=create_app(container))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def delete_queues(settings: Settings) -> None:
    """Delete the test's queues, straight on the broker (not through any relay)."""
    if settings.queue_backend != "rabbitmq" or settings.rabbitmq_url is None:
        return
    connection = pika.BlockingConnection(pika.URLParameters(settings.rabbitmq_url))
    channel = connection.channel()
    for queue in (settings.rabbitmq_queue, f"{settings.rabbitmq_queue}.dead"):
        channel.queue_delete(queue)
    connection.close()


@asynccontextmanager
async def database_behind_a_relay(
    settings: Settings, database_url: str
) -> AsyncIterator[tuple[TcpProxy, httpx.AsyncClient, httpx.Response]]:
    """The app with its database behind a relay, and the 201 of one POST made while the
    relay is up; the relay goes down and the test's queues are deleted afterwards."""
    proxy = TcpProxy.to_postgres(database_url)
    await proxy.up()
    try:
        async with app_with(attrs.evolve(settings, database_url=proxy.url)) as client:
            before = await client.post("/workflow", json={"data": {"n": "before"}})
            assert before.status_code == 201, before.text
            yield proxy, client, before
    finally:
        await proxy.down()
        delete_queues(settings)


@pytest.fixture
def impatient(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request waits 1 s, not 5 s, for a database connection before answering 503."""
    monkeypatch.setattr(database_module, "ACQUIRE_TIMEOUT", 1.0)


async def count(pg: PostgresDatabase, table: str) -> int:
    async with pg.pool.connection() as conn:
        row = await (await conn.execute(f"SELECT count(*) FROM {table}")).fetchone()
    assert row is not None
    return int(row[0])


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    assert response.json()["type"] == "/problems/service-unavailable"
    assert int(response.headers["retry-after"]) > 0


async def readiness(client: httpx.AsyncClient) -> dict[str, str]:
    """The checks of a /readyz that answers 503 (with Retry-After): each `ok` or
    `unavailable`, the reason not told (it is logged)."""
    response = await client.get("/readyz")
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) > 0
    checks: dict[str, str] = response.json()["checks"]
    assert set(checks.values()) <= {"ok", "unavailable"}, checks
    return checks


async def eventually(
    call: Callable[[], Awaitable[httpx.Response]], *, status: int
) -> httpx.Response:
    """`call` retried on 503, as a client honouring Retry-After would, until it answers
    `status`; fails after RECOVERY_DEADLINE."""
    deadline = time.monotonic() + RECOVERY_DEADLINE
    while True:
        response = await call()
        if response.status_code != 503 or time.monotonic() > deadline:
            assert response.status_code == status, response.text
            return response
        await asyncio.sleep(0.2)


async def until(value: Callable[[], Awaitable[T]], *, equals: T, what: str) -> None:
    """Poll `value` until it `equals`; fail after RECOVERY_DEADLINE."""
    deadline = time.monotonic() + RECOVERY_DEADLINE
    while (latest := await value()) != equals:
        assert time.monotonic() < deadline, f"{what}: still {latest}, not {equals}"
        await asyncio.sleep(0.2)


def ready_status(client: httpx.AsyncClient) -> Callable[[], Awaitable[str]]:
    async def status() -> str:
        body: dict[str, str] = (await client.get("/readyz")).json()
        return body["status"]

    return status


async def consume_all(client: httpx.AsyncClient, expected: int) -> list[str]:
    """The uuids consumed until `expected` workflows came out (the relay may still be
    delivering some), and by one more call, which should find none."""
    taken: list[str] = []
    deadline = time.monotonic() + RECOVERY_DEADLINE
    while len(taken) < expected and time.monotonic() < deadline:
        response = await client.post("/workflow/consume", params={"wait": "1"})
        assert response.status_code in (200, 204), response.text
        if response.status_code == 200:
            taken.append(response.headers["x-workflow-uuid"])
    response = await client.post("/workflow/consume")
    assert response.status_code in (200, 204), response.text
    if response.status_code == 200:
        taken.append(response.headers["x-workflow-uuid"])
    return taken


@pytest.mark.usefixtures("impatient")
async def test_database_away_and_back_answers_503_then_recovers_without_a_restart(
    backend_settings: Settings, database_url: str, pg: PostgresDatabase
) -> None:
    async with database_behind_a_relay(backend_settings, database_url) as (proxy, client, before):
        key = {"Idempotency-Key": "posted-during-the-outage"}
        during = {"data": {"n": "during"}}

        await proxy.down()
        for response in await asyncio.gather(
            client.post("/workflow", json=during, headers=key),
            client.post("/workflow", json={"data": {"n": "lost"}}),
            client.get("/workflow"),
            client.get(before.headers["location"]),
            client.post("/workflow/consume"),  # `before` is queued: it needs the database
        ):
            assert_unavailable(response)
        checks = await readiness(client)
        assert checks["database"] == "unavailable"
        if backend_settings.queue_backend == "rabbitmq":
            assert checks["queue"] == "ok"  # the check that fails is the database's

        await proxy.up()
        retried = await eventually(
            lambda: client.post("/workflow", json=during, headers=key), status=201
        )
        assert "idempotent-replayed" not in retried.headers  # the failed try left no key
        assert (await client.get("/readyz")).status_code == 200
        listed = (await client.get("/workflow")).json()
        assert [w["uuid"] for w in listed] == [before.json()["uuid"], retried.json()["uuid"]]
        consumed = await consume_all(client, expected=2)
        assert sorted(consumed) == sorted(w["uuid"] for w in listed)
        # A POST right after the outage may leave its entry to the relay's next sweep
        # (its consume took it from the outbox): the sweep still delivers it.
        await until(lambda: count(pg, "outbox"), equals=0, what="the outbox drained")
    assert await count(pg, "workflows") == 2  # nothing from the failed POSTs
    assert await count(pg, "idempotency_keys") == 1
    assert await count(pg, "outbox") == 0


@pytest.mark.usefixtures("impatient")
async def test_a_database_that_stops_answering_gets_503s_in_bounded_time_then_serves_again(
    backend_settings: Settings,
    database_url: str,
    pg: PostgresDatabase,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PostgreSQL hangs with its connections open (a relay holds every byte): every
    request that needs it gets its 503 within the query timeout (0.5 s here) and the
    question a POST then asks (0.5 s), and /readyz its verdict within the 1 s connection
    timeout, where each waited for as long as the server did; once it answers again the
    same app serves, and a POST retried with its key is stored once."""
    monkeypatch.setattr(database_module, "QUERY_TIMEOUT", 0.5)
    for module in (workflows_module, batching_module):
        monkeypatch.setattr(module, "VERIFY_WITHIN", 0.5)
    async with database_behind_a_relay(backend_settings, database_url) as (proxy, client, before):
        key = {"Idempotency-Key": "posted-while-it-hung"}
        during = {"data": {"n": "during"}}

        proxy.stall()
        began = time.monotonic()
        requests = asyncio.gather(
            client.post("/workflow", json=during, headers=key),
            client.get("/workflow"),
            client.get(before.headers["location"]),
            client.post("/workflow/consume"),
            client.patch(before.headers["location"], json={"status": "consumed"}),
        )
        responses = await asyncio.wait_for(requests, 10)
        waited = time.monotonic() - began
        for response in responses:
            assert_unavailable(response)
        assert waited < 3.0, f"the 503s came after {waited:.2f} s"
        began = time.monotonic()
        checks = await asyncio.wait_for(readiness(client), 10)
        assert checks["database"] == "unavailable"
        assert time.monotonic() - began < 2.5

        proxy.flow()
        retried = await eventually(
            lambda: client.post("/workflow", json=during, headers=key), status=201
        )
        assert (await client.get("/readyz")).status_code == 200
        listed = (await client.get("/workflow")).json()
        assert [w["data"]["n"] for w in listed].count("during") == 1
        assert retried.json()["uuid"] in [w["uuid"] for w in listed]


@pytest.mark.rabbitmq
@pytest.mark.parametrize("backend_settings", ["rabbitmq"], indirect=True)
async def test_broker_away_keeps_posts_in_the_outbox_serves_consumes_from_the_rows_and_recovers(
    backend_settings: Settings, rabbitmq_url: str, pg: PostgresDatabase
) -> None:
    proxy = TcpProxy.to_amqp(rabbitmq_url)
    await proxy.up()
    try:
        async with app_with(attrs.evolve(backend_settings, rabbitmq_url=proxy.url)) as client:
            await proxy.down()
            posted = []
            for n in range(3):
                response = await client.post("/workflow", json={"data": {"n": n}})
                assert response.status_code == 201, response.text
                posted.append(response.json()["uuid"])
            assert await count(pg, "outbox") > 0  # stored, waiting for the broker
            # Degraded, not unready: every request is still served (200, so traffic keeps
            # coming), and consumes go on meanwhile, from the database's rows, oldest first.
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json() == {
                "status": "degraded",
                "checks": {"database": "ok", "queue": "unavailable", "exports": "ok"},
            }
            during = []
            for _ in range(2):
                response = await client.post("/workflow/consume")
                assert response.status_code == 200, response.text
                during.append(response.headers["x-workflow-uuid"])
            assert during == posted[:2]

            await proxy.up()
            await until(lambda: count(pg, "outbox"), equals=0, what="the outbox drained")
            await until(ready_status(client), equals="ready", what="/readyz ready")
            # The messages of the two taken meanwhile are skipped: each exactly once.
            assert await consume_all(client, expected=1) == posted[2:]
    finally:
        await proxy.down()
        delete_queues(backend_settings)


# --- real `workflows serve` processes -----------------------------------------------

OUR_VARIABLES = ("API_TOKENS", "PROMETHEUS_MULTIPROC_DIR", "QUEUE_BACKEND", "RABBITMQ_URL")
LOAD_CLIENTS = 4
LOAD_SECONDS = 8.0
WAITERS = 5
GRACEFUL_TIMEOUT = 10.0
"""`serve --graceful-timeout`: in-flight requests still running after this are cut."""


@pytest.fixture
def server_env(backend_settings: Settings, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment of `workflows serve` on the test's database (emptied by `pg`) and
    queue; TMPDIR too, so that whatever the server leaves behind is seen."""
    (tmp_path / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in OUR_VARIABLES}
    env |= {
        "DATABASE_URL": str(backend_settings.database_url),
        "QUEUE_BACKEND": backend_settings.queue_backend,
        "EXPORT_DIR": str(tmp_path / "exports"),
        "TMPDIR": str(tmp_path / "tmp"),
        "LOG_FORMAT": "json",
        "DB_POOL_SIZE": "4",
    }
    if backend_settings.rabbitmq_url is not None:
        env |= {
            "RABBITMQ_URL": backend_settings.rabbitmq_url,
            "RABBITMQ_QUEUE": backend_settings.rabbitmq_queue,
        }
    yield env
    delete_queues(backend_settings)


@attrs.define
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def workers(self) -> set[int]:
        """The pids of uvicorn's worker processes (the children that run `spawn_main`, not
        multiprocessing's resource tracker); empty when the server runs in one process."""
        pids: set[int] = set()
        for children in Path(f"/proc/{self.process.pid}/task").glob("*/children"):
            for pid in children.read_text().split():
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except FileNotFoundError:
                    continue  # gone since
                if b"spawn_main" in cmdline:
                    pids.add(int(pid))
        return pids

    def started(self) -> int:
        """How many workers have finished their start-up (each logs it once)."""
        return self.log.read_text().count("Application startup complete.")

    def tail(self) -> str:
        return "\n".join(self.log.read_text().splitlines()[-40:])


@contextmanager
def serving(env: dict[str, str], cwd: Path, workers: int) -> Iterator[Server]:
    """`workflows serve` on a free port, in a session of its own, once /readyz says ready;
    stopped (SIGTERM, then SIGKILL of its whole session as a last resort) on the way out."""
    port = free_port()
    name = f"serve-{port}"
    arguments: tuple[str, ...] = ("serve", "--port", str(port), "--workers", str(workers))
    arguments += ("--graceful-timeout", str(GRACEFUL_TIMEOUT))
    with running_process(env, cwd, *arguments, name=name, stop_timeout=30) as process:
        server = Server(process, f"http://127.0.0.1:{port}", cwd / f"{name}.log")
        deadline = time.monotonic() + RECOVERY_DEADLINE
        while not ready(server.url):
            assert process.poll() is None, f"serve exited {process.returncode}:\n{server.tail()}"
            assert time.monotonic() < deadline, f"serve not ready:\n{server.tail()}"
            time.sleep(0.2)
        yield server


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def fresh_connections(server: Server) -> httpx.AsyncClient:
    """A client of `server` that opens a new connection for every request. Why not keep
    connections alive: a worker that stops closes its idle ones, and a client may send
    its next request on one just as it closes. That request never reached a server;
    resending it is the client's job (any HTTP client must handle this keep-alive race),
    not a failure of the rolling restart."""
    return httpx.AsyncClient(
        base_url=server.url,
        headers={"Connection": "close"},
        limits=httpx.Limits(max_keepalive_connections=0),
        timeout=30,
    )


@attrs.define
class Load:
    """What the clients saw: every answer, every failure to get one."""

    posted: list[str] = attrs.Factory(list)
    consumed: list[str] = attrs.Factory(list)
    answers: list[int] = attrs.Factory(list)
    failures: list[str] = attrs.Factory(list)
    sent: int = 0

    async def run(self, server: Server, client: int, stop: asyncio.Event) -> None:
        async with fresh_connections(server) as http:
            n = 0
            while not stop.is_set():
                n += 1
                body = {"data": {"client": client, "n": n}}
                if response := await self.send(http.post("/workflow", json=body)):
                    self.posted.append(response.json()["uuid"])
                response = await self.send(http.post("/workflow/consume"))
                if response is not None and response.status_code == 200:
                    self.consumed.append(response.headers["x-workflow-uuid"])

    async def send(self, request: Awaitable[httpx.Response]) -> httpx.Response | None:
        self.sent += 1
        try:
            response = await request
        except httpx.TransportError as error:
            self.failures.append(f"{error.request.method} {error.request.url.path}: {error!r}")
            return None
        self.answers.append(response.status_code)
        if response.status_code not in (200, 201, 204):
            self.failures.append(f"{response.status_code}: {response.text}")
            return None
        return response


async def replace_each_worker(server: Server) -> set[int]:
    """SIGTERM one worker, wait until uvicorn's supervisor has started a replacement
    that finished its start-up, then the other: a rolling restart. The new pids."""
    original = server.workers()
    assert len(original) == 2, server.tail()
    started = server.started()
    for pid in sorted(original):
        os.kill(pid, signal.SIGTERM)
        started += 1
        deadline = time.monotonic() + RECOVERY_DEADLINE
        while server.started() < started or pid in server.workers():
            assert server.process.poll() is None, server.tail()
            assert time.monotonic() < deadline, f"worker {pid} not replaced:\n{server.tail()}"
            await asyncio.sleep(0.2)
    replacements = server.workers()
    assert len(replacements) == 2
    assert not replacements & original, "the supervisor replaced both workers"
    return replacements


async def test_rolling_restart_of_the_workers_under_load_fails_no_request(
    server_env: dict[str, str], tmp_path: Path, pg: PostgresDatabase
) -> None:
    with serving(server_env, tmp_path, workers=2) as server:
        load, stop = Load(), asyncio.Event()
        clients = [asyncio.create_task(load.run(server, n, stop)) for n in range(LOAD_CLIENTS)]
        began = time.monotonic()
        try:
            await asyncio.sleep(1.5)  # the load is running on both workers
            await replace_each_worker(server)
            await asyncio.sleep(max(1.5, LOAD_SECONDS - (time.monotonic() - began)))
        finally:
            stop.set()
            await asyncio.gather(*clients)
        async with fresh_connections(server) as http:  # what the load left queued
            drain = await consume_all(http, expected=len(load.posted) - len(load.consumed))
    # A request on a new connection must be answered even by a worker that is stopping:
    # if it accepted the connection, it reads and answers the request before it exits.
    failed = f"{len(load.failures)} of {load.sent} failed: {load.failures[:5]}; see {server.log}"
    assert not load.failures, failed
    assert set(load.answers) <= {200, 201, 204}
    assert len(load.posted) == len(set(load.posted)) > 0
    consumed = load.consumed + drain
    assert len(consumed) == len(set(consumed)), "a workflow was consumed twice"
    assert sorted(consumed) == sorted(load.posted), "every POSTed workflow exists, consumed"
    assert await count(pg, "workflows") == len(load.posted)
    assert await count(pg, "outbox") == 0


def accepted_connections(server: Server) -> int:
    """Connections to the server's port that its serving processes have accepted."""
    port = int(server.url.rsplit(":", 1)[1])
    inodes: set[str] = set()
    for pid in server.workers() or {server.process.pid}:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except FileNotFoundError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    established = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01" and fields[9] in inodes:
                established += 1
    return established


@pytest.mark.parametrize(
    ("backend_settings", "workers"),
    [("postgres", 1), ("rabbitmq", 2)],
    indirect=["backend_settings"],
)
async def test_sigterm_answers_every_long_polling_consumer_with_204_then_exits_0(
    server_env: dict[str, str], tmp_path: Path, workers: int
) -> None:
    with serving(server_env, tmp_path, workers) as server:
        exited = asyncio.Event()

        async def long_poll(http: httpx.AsyncClient) -> tuple[int, bool]:
            response = await http.get("/workflow/consume", params={"wait": "20"})
            return response.status_code, exited.is_set()

        async with fresh_connections(server) as http:
            waiters = [asyncio.create_task(long_poll(http)) for _ in range(WAITERS)]
            await until(
                lambda: asyncio.to_thread(accepted_connections, server),
                equals=WAITERS,
                what="waiters the server has accepted",
            )
            await asyncio.sleep(0.5)  # their requests, sent on connecting, have been read
            server.process.send_signal(signal.SIGTERM)
            status = await asyncio.to_thread(server.process.wait, 3 * GRACEFUL_TIMEOUT)
            exited.set()
            answers = await asyncio.gather(*waiters)
    # Waiters still waiting after GRACEFUL_TIMEOUT (10 s, shorter than their 20 s) would
    # have been cut without an answer: a 204 each is the shutdown answering them at once.
    assert answers == [(204, False)] * WAITERS, "every waiter answered 204 before the exit"
    assert status == 0, server.tail()
    assert list((tmp_path / "tmp").iterdir()) == []  # PROMETHEUS_MULTIPROC_DIR removed
