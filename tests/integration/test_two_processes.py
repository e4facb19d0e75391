"""Real `workflows` processes on one database and broker, as N replicas would run.

Each test starts servers with the console script (tests/support/processes.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from uuid import UUID

import httpx
import orjson
import pika
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.processes import (
    WORKFLOWS_BIN,
    inherited_environment,
    running,
    served,
    serving,
)
from workflows.adapters.postgres import PostgresDatabase, PostgresWorkflowRepository
from workflows.domain.ids import uuid7
from workflows.domain.model import JsonDocument, Workflow
from workflows.entrypoints.container import utc_now

WORKFLOWS = 100
CONSUMERS = 8
DEADLINE = 60.0
TOKEN = "two-processes-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(params=["postgres", "rabbitmq"])
def server_env(
    request: pytest.FixtureRequest, database_url: str, pg: PostgresDatabase, tmp_path: Path
) -> Iterator[dict[str, str]]:
    """The environment of every server of one test: one database (emptied by `pg`), one
    queue of its own, one export directory, a token; no .env (they run in tmp_path), and a
    TMPDIR of their own (the metrics directories)."""
    env = inherited_environment()
    (tmp_path / "tmp").mkdir()
    env |= {
        "TMPDIR": str(tmp_path / "tmp"),
        "DATABASE_URL": database_url,
        "QUEUE_BACKEND": request.param,
        "EXPORT_DIR": str(tmp_path / "exports"),
        "API_TOKENS": TOKEN,
        "LOG_FORMAT": "json",
        "DB_POOL_SIZE": "4",
    }
    if request.param == "rabbitmq":
        rabbitmq_url = request.getfixturevalue("rabbitmq_url")
        queue = request.getfixturevalue("queue_name")
        env |= {"RABBITMQ_URL": rabbitmq_url, "RABBITMQ_QUEUE": queue}
    yield env
    if request.param == "rabbitmq":
        connection = pika.BlockingConnection(pika.URLParameters(env["RABBITMQ_URL"]))
        connection.channel().queue_delete(env["RABBITMQ_QUEUE"])
        connection.close()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(headers=AUTH, timeout=30) as client:
        yield client


async def test_two_api_processes_hand_each_workflow_to_exactly_one_consumer(
    server_env: dict[str, str], tmp_path: Path, http: httpx.AsyncClient, database_url: str
) -> None:
    with served(server_env, tmp_path, "api-a") as a, served(server_env, tmp_path, "api-b") as b:
        urls = (a, b)
        posted = await post_all(http, urls)
        consumed = await consume_all(http, urls)

    uuids = [uuid for uuid, _ in consumed]
    assert len(uuids) == len(set(uuids)), "a workflow was consumed twice"
    assert set(uuids) == posted, "a workflow was lost"
    assert {url for _, url in consumed} == set(urls), "both processes served consumes"
    exports = {path.stem for path in (tmp_path / "exports").glob("*.csv")}
    assert exports == {str(uuid) for uuid in posted}
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT status::text, count(*) FROM workflows GROUP BY 1").fetchall()
    assert dict(rows) == {"consumed": WORKFLOWS}

    stats = await asyncio.to_thread(
        subprocess.run,
        [str(WORKFLOWS_BIN), "stats", "--json"],
        env=server_env,
        cwd=tmp_path,
        capture_output=True,
        check=True,
    )
    report = orjson.loads(stats.stdout)
    assert (report["queue_depth"], report["dead_letters"]) == (0, 0)
    assert report["workflows"] == {"consumed": WORKFLOWS}
    with psycopg.connect(database_url) as conn:
        oldest = conn.execute("SELECT min(updated_at) FROM workflows").fetchone()
    assert oldest is not None
    assert datetime.fromisoformat(report["oldest_consumed_at"]) == oldest[0]
    if server_env["QUEUE_BACKEND"] == "rabbitmq":
        assert report["outbox"]["entries"] == 0


@pytest.mark.parametrize("server_env", ["rabbitmq"], indirect=True)
@pytest.mark.parametrize("away", ["broker", "queue"])
async def test_stats_json_is_one_document_while_the_queue_cannot_be_read(
    server_env: dict[str, str], tmp_path: Path, away: str
) -> None:
    """The warning that the depth could not be read goes to stderr: stdout is the answer
    a script parses, and it wanted that document most when the broker was away."""
    if away == "broker":
        env = server_env | {"RABBITMQ_URL": "amqp://guest:guest@127.0.0.1:1/%2F"}
    else:
        env = server_env | {"RABBITMQ_QUEUE": f"{server_env['RABBITMQ_QUEUE']}-never-declared"}
    for log_format in ("json", "text"):
        stats = await asyncio.to_thread(
            subprocess.run,
            [str(WORKFLOWS_BIN), "stats", "--json"],
            env=env | {"LOG_FORMAT": log_format},
            cwd=tmp_path,
            capture_output=True,
            check=True,
        )
        report = orjson.loads(stats.stdout)
        assert report["queue_depth"] is None
        assert "queue depth could not be read" in stats.stderr.decode()


async def test_a_restart_after_kill_rewrites_the_torn_exports_the_flush_had_not_reached(
    server_env: dict[str, str], tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """kill -9, then what a power failure could have done to the files written since the
    last flush (with EXPORT_FLUSH_INTERVAL=3600 none was flushed): the next start rewrites
    them before it is ready, from the data in the database."""
    env = server_env | {"EXPORT_FLUSH_INTERVAL": "3600"}
    exports = tmp_path / "exports"
    with serving(env, tmp_path, "before") as (url, process):
        posted = await post_all(http, (url, url))
        consumed = await consume_all(http, (url, url))
        first_flush = (exports / ".flushed").read_text()
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    csvs = {uuid: (exports / f"{uuid}.csv").read_bytes() for uuid, _ in consumed}
    assert set(csvs) == posted
    torn = sorted(csvs)[::3]
    for n, uuid in enumerate(torn):
        (exports / f"{uuid}.csv").write_bytes(csvs[uuid][: n % 5])  # empty, or cut short
    # No stale temporary file or record: the kill left the directory as it was.
    assert (exports / ".flushed").read_text() == first_flush

    with served(env, tmp_path, "after") as url:
        for uuid in torn:  # ready means repaired (EXPORT_FLUSH_INTERVAL=3600: not flushed)
            response = await http.get(f"{url}/workflow/{uuid}/csv")
            assert (exports / f"{uuid}.csv").read_bytes() == response.content == csvs[uuid]
    log = (tmp_path / "after.log").read_text()
    assert f"rewrote {len(torn)} export files left torn by a crash" in log
    assert (exports / ".flushed").read_text() > first_flush, "a clean stop flushes"


async def test_a_long_poll_whose_client_hung_up_takes_nothing(
    server_env: dict[str, str], tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """A waiting consume whose client has closed its connection is woken by the next POST,
    sees that its client has gone (uvicorn's http.disconnect) and leaves the workflow
    queued for a consumer that is there."""
    with served(server_env, tmp_path, "api") as url:
        async with httpx.AsyncClient(headers=AUTH, timeout=30) as leaving:
            waiting = asyncio.create_task(leaving.get(f"{url}/workflow/consume?wait=20"))
            await asyncio.sleep(0.5)
            assert not waiting.done()
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
        await asyncio.sleep(0.2)  # the server has seen the connection close
        uuid = (await http.post(f"{url}/workflow", json={"data": {"a": 1}})).json()["uuid"]
        await asyncio.sleep(1.0)  # the doorbell has woken the abandoned waiter by now
        assert (await http.get(f"{url}/workflow/{uuid}")).json()["status"] == "inserted"
        response = await http.get(f"{url}/workflow/consume")
        assert response.status_code == 200
        assert response.headers["x-workflow-uuid"] == uuid


async def post_all(http: httpx.AsyncClient, urls: tuple[str, str]) -> set[UUID]:
    limit = asyncio.Semaphore(16)

    async def post(n: int) -> UUID:
        async with limit:
            response = await http.post(f"{urls[n % 2]}/workflow", json={"data": {"n": n}})
        assert response.status_code == 201, response.text
        return UUID(response.json()["uuid"])

    posted = set(await asyncio.gather(*(post(n) for n in range(WORKFLOWS))))
    assert len(posted) == WORKFLOWS
    return posted


async def consume_all(http: httpx.AsyncClient, urls: tuple[str, str]) -> list[tuple[UUID, str]]:
    """CONSUMERS clients, each alternating between the processes, until every workflow
    has been handed out (or the deadline passes: then one was lost)."""
    consumed: list[tuple[UUID, str]] = []
    deadline = time.monotonic() + DEADLINE

    async def consumer(n: int) -> None:
        while len(consumed) < WORKFLOWS and time.monotonic() < deadline:
            url = urls[n % 2]
            n += 1
            response = await http.post(f"{url}/workflow/consume")
            if response.status_code == 200:
                consumed.append((UUID(response.headers["x-workflow-uuid"]), url))
            else:
                assert response.status_code == 204, response.text
                await asyncio.sleep(0.05)  # the rabbitmq outbox may still be delivering

    await asyncio.gather(*(consumer(n) for n in range(CONSUMERS)))
    return consumed


@pytest.mark.parametrize("server_env", ["postgres"], indirect=True)
async def test_metrics_add_up_the_workers_of_one_server(
    server_env: dict[str, str], tmp_path: Path
) -> None:
    requests = 40
    with served(server_env, tmp_path, "api-2-workers", workers=2) as url:
        for _ in range(requests):  # a connection each, so both workers take some
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"{url}/healthz")).status_code == 200
        deadline = time.monotonic() + 15
        while True:
            samples = await scrape(url)
            both_sampled = samples.get(("workflows_db_pool_max_connections", ())) == 2 * 4
            if both_sampled or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    assert both_sampled, "the pool gauges of the two workers add up (DB_POOL_SIZE=4 each)"
    healthz = (("method", "GET"), ("route", "/healthz"), ("status", "200"))
    assert samples[("workflows_http_requests_total", healthz)] == requests
    assert samples[("workflows_queue_depth", (("backend", "postgres"),))] == 0
    assert samples[("workflows_dead_letters", ())] == 0


@pytest.mark.parametrize("server_env", ["rabbitmq"], indirect=True)
async def test_metrics_show_the_messages_a_consuming_process_holds_apart_from_the_depth(
    server_env: dict[str, str], tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """A consuming process holds queued messages ahead (RABBITMQ_PREFETCH, 32 by default)
    that the broker no longer counts as ready: workflows_queue_held shows them, and with
    workflows_queue_depth they add up to what is queued. Left idle, the process gives them
    back, and the depth counts them again."""
    posted = 12
    depth = ("workflows_queue_depth", (("backend", "rabbitmq"),))
    held = ("workflows_queue_held", ())
    with served(server_env, tmp_path, "api") as url:
        for n in range(posted):
            response = await http.post(f"{url}/workflow", json={"data": {"n": n}})
            assert response.status_code == 201
        deadline = time.monotonic() + 15
        while (samples := await scrape(url))[depth] < posted:  # the relay has published all
            assert time.monotonic() < deadline, samples[depth]
            await asyncio.sleep(0.1)
        assert samples[held] == 0, "nothing is held before the first consume"
        queued = posted
        while True:  # a consume each time round: the process never idles meanwhile
            assert (await http.post(f"{url}/workflow/consume")).status_code == 200
            queued -= 1
            samples = await scrape(url)
            if samples[held] > 0 and samples[held] + samples[depth] == queued:
                break
            assert queued > 1, f"never seen held: {samples[held]} + {samples[depth]}"
        deadline = time.monotonic() + 15
        while (samples := await scrape(url))[held] > 0:  # idle for a second: given back
            assert time.monotonic() < deadline, samples[held]
            await asyncio.sleep(0.2)
        assert samples[depth] == queued


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{url}/metrics")  # public by default, even with tokens
    assert response.status_code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


@pytest.mark.parametrize("server_env", ["rabbitmq"], indirect=True)
async def test_the_relay_command_delivers_the_outbox_with_no_api_running(
    server_env: dict[str, str], tmp_path: Path, pg: PostgresDatabase
) -> None:
    repository = PostgresWorkflowRepository(pg.pool, outbox=True)
    for n in range(3):
        await repository.add(Workflow.new(uuid7(), JsonDocument(f'{{"n": {n}}}'), (), utc_now()))

    async def outbox_size() -> int:
        async with pg.pool.connection() as conn:
            row = await (await conn.execute("SELECT count(*) FROM outbox")).fetchone()
        assert row is not None
        return int(row[0])

    assert await outbox_size() == 3
    with running(server_env, tmp_path, "relay", name="relay") as relay:
        deadline = time.monotonic() + 20
        while await outbox_size() and time.monotonic() < deadline:
            assert relay.poll() is None, (tmp_path / "relay.log").read_text()
            await asyncio.sleep(0.2)
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(timeout=15) == 0
    assert await outbox_size() == 0
    connection = pika.BlockingConnection(pika.URLParameters(server_env["RABBITMQ_URL"]))
    declared = connection.channel().queue_declare(server_env["RABBITMQ_QUEUE"], passive=True)
    connection.close()
    assert declared.method.message_count == 3


async def prune(env: dict[str, str], cwd: Path, *arguments: str) -> str:
    """`workflows prune` as an operator runs it beside a serving process; its output."""
    done = await asyncio.to_thread(
        subprocess.run,
        [str(WORKFLOWS_BIN), "prune", *arguments],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_the_prune_command_deletes_consumed_workflows_and_exports_beside_a_server(
    server_env: dict[str, str], tmp_path: Path, http: httpx.AsyncClient
) -> None:
    exports = tmp_path / "exports"
    with served(server_env, tmp_path, "api") as url:
        posted = [
            (await http.post(f"{url}/workflow", json={"data": {"n": n}})).json()["uuid"]
            for n in range(4)
        ]
        consumed = []
        for _ in range(3):
            response = await http.get(f"{url}/workflow/consume")
            assert response.status_code == 200, response.text
            consumed.append(response.headers["x-workflow-uuid"])
        assert consumed == posted[:3]
        (exports / "notes.txt").write_text("not ours")

        said = await prune(server_env, tmp_path, "--workflows-older-than", "1h", "--dry-run")
        assert said == "workflows  would delete 0 consumed more than 1h ago\n"
        said = await prune(server_env, tmp_path, "--workflows-older-than", "0s", "--dry-run")
        assert said == "workflows  would delete 3 consumed more than 0s ago\n"
        assert {p.name for p in exports.glob("*.csv")} == {f"{u}.csv" for u in consumed}

        said = await prune(server_env, tmp_path, "--workflows-older-than", "0s")
        assert said == (
            "workflows  deleted 3 consumed more than 0s ago, and 3 export files of theirs\n"
        )
        for uuid in consumed:
            assert (await http.get(f"{url}/workflow/{uuid}")).status_code == 404
        listed = (await http.get(f"{url}/workflow")).json()
        assert [w["uuid"] for w in listed] == [posted[3]]  # queued: never pruned
        assert sorted(p.name for p in exports.iterdir() if p.name != ".flushed") == ["notes.txt"]

        # The one left is consumed, its file removed for its age: its CSV is still served.
        response = await http.get(f"{url}/workflow/consume")
        assert response.headers["x-workflow-uuid"] == posted[3]
        said = await prune(server_env, tmp_path, "--exports-older-than", "0s")
        assert said == f"exports    deleted 1 files written more than 0s ago ({exports})\n"
        assert not (exports / f"{posted[3]}.csv").exists()
        again = await http.get(f"{url}/workflow/{posted[3]}/csv")
        assert again.status_code == 200
        assert again.content == response.content
        assert (exports / "notes.txt").exists()
