"""The HTTP API on in-memory adapters: the happy paths of every endpoint."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from uuid import UUID

import httpx
import pytest

from tests.openapi_check import check_response
from workflows.domain.errors import DependencyUnavailable
from workflows.entrypoints.config import Settings
from workflows.entrypoints.container import Container
from workflows.entrypoints.http import RECOVERING, create_app

JSON_HEADERS = {"Content-Type": "application/json"}


async def post(client: httpx.AsyncClient, body: str, prefix: str = "") -> httpx.Response:
    return await client.post(f"{prefix}/workflow", content=body, headers=JSON_HEADERS)


async def test_post_stores_and_answers_the_workflow(client: httpx.AsyncClient) -> None:
    response = await post(client, '{"data": {"name": "x", "n": 1}, "steps": ["a", "b"]}')
    assert response.status_code == 201
    body = response.json()
    assert UUID(body["uuid"]).version == 7
    assert response.headers["location"] == f"/workflow/{body['uuid']}"
    assert body["status"] == "inserted"
    assert body["data"] == {"name": "x", "n": 1}
    assert body["steps"] == ["a", "b"]
    assert body["created_at"] == body["updated_at"]
    assert body["created_at"].endswith("Z")
    fetched = await client.get(f"/workflow/{body['uuid']}")
    assert fetched.status_code == 200
    assert fetched.json() == body


async def test_post_keeps_key_order_and_exact_numbers(client: httpx.AsyncClient) -> None:
    data = '{"z": 123456789012345678901234567890, "a": 0.1000000000000000000001, "m": 1E+400}'
    response = await post(client, '{"data": ' + data + "}")
    assert response.status_code == 201
    assert (
        '"data":{"z":123456789012345678901234567890,"a":0.1000000000000000000001,"m":1E+400}'
        in (response.text)
    )
    assert response.json()["steps"] == []


async def test_post_accepts_an_array_of_objects(client: httpx.AsyncClient) -> None:
    response = await post(client, '{"data": [{"a": 1}, {"b": 2}]}', prefix="/v1")
    assert response.status_code == 201
    assert response.headers["location"].startswith("/v1/workflow/")
    assert response.json()["data"] == [{"a": 1}, {"b": 2}]


async def test_list_is_oldest_first_with_limit_link_and_cursor(client: httpx.AsyncClient) -> None:
    uuids = [(await post(client, f'{{"data": {{"i": {i}}}}}')).json()["uuid"] for i in range(5)]
    first = await client.get("/workflow", params={"limit": "2"})
    assert first.status_code == 200
    assert [w["uuid"] for w in first.json()] == uuids[:2]
    assert first.headers["link"] == f'</workflow?limit=2&after={uuids[1]}>; rel="next"'
    second = await client.get(f"/workflow?limit=2&after={uuids[1]}")
    assert [w["uuid"] for w in second.json()] == uuids[2:4]
    last = await client.get(f"/workflow?limit=2&after={uuids[3]}")
    assert [w["uuid"] for w in last.json()] == uuids[4:]
    assert "link" not in last.headers


async def walk(client: httpx.AsyncClient, url: str) -> list[list[str]]:
    """The uuids of every page from `url` on, following the Link headers."""
    pages = []
    while True:
        response = await client.get(url)
        assert response.status_code == 200
        pages.append([w["uuid"] for w in response.json()])
        if "link" not in response.headers:
            return pages
        url = response.headers["link"].removeprefix("<").split(">;")[0]


@pytest.mark.parametrize("hot_routes", [True, False], ids=["hot", "starlette"])
async def test_a_list_page_ends_early_once_its_data_passes_list_page_bytes(
    tmp_path: Path, hot_routes: bool
) -> None:
    settings = Settings(queue_backend="memory", export_dir=tmp_path, list_page_bytes=1000)
    app = create_app(Container(settings=settings), hot_routes=hot_routes)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://test",
        event_hooks={"response": [check_response]},
    ) as client:
        sizes = [400, 400, 400, 2000, 400, 400]  # of data, stored as {"i":0,"p":"xx…x"}
        uuids = []
        for i, size in enumerate(sizes):
            body = f'{{"data": {{"i": {i}, "p": "{"x" * (size - 14)}"}}}}'
            uuids.append((await post(client, body)).json()["uuid"])
        # Pages end at the first workflow whose predecessors on it hold 1000 bytes; a
        # workflow over the budget on its own is a page of its own.
        assert await walk(client, "/workflow") == [uuids[0:3], uuids[3:4], uuids[4:6]]
        assert await walk(client, "/workflow?limit=2") == [
            uuids[0:2],
            uuids[2:4],
            uuids[4:6],
        ]
        first = await client.get("/workflow")
        assert first.headers["link"] == f'</workflow?limit=100&after={uuids[2]}>; rel="next"'
        # Cut short or not, the last page has no link.
        assert await walk(client, f"/workflow?after={uuids[3]}") == [uuids[4:6]]


async def test_list_filters_by_status(client: httpx.AsyncClient) -> None:
    first = (await post(client, '{"data": {"i": 1}}')).json()["uuid"]
    second = (await post(client, '{"data": {"i": 2}}')).json()["uuid"]
    await client.patch(f"/workflow/{first}", json={"status": "consumed"})
    consumed = await client.get("/workflow?status=consumed")
    inserted = await client.get("/v1/workflow?status=inserted")
    assert [w["uuid"] for w in consumed.json()] == [first]
    assert [w["uuid"] for w in inserted.json()] == [second]


async def test_list_of_nothing_is_an_empty_array(client: httpx.AsyncClient) -> None:
    response = await client.get("/workflow")
    assert response.status_code == 200
    assert response.json() == []


async def test_consume_returns_204_when_queue_is_empty(client: httpx.AsyncClient) -> None:
    response = await client.get("/workflow/consume")
    assert response.status_code == 204
    assert response.content == b""


async def test_consume_answers_csv_writes_file_and_marks_consumed(
    client: httpx.AsyncClient, container: Container
) -> None:
    uuid = (await post(client, '{"data": [{"a": 1, "b": "x,y"}, {"a": 2}]}')).json()["uuid"]
    response = await client.get("/workflow/consume")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["x-workflow-uuid"] == uuid
    assert response.headers["content-disposition"] == f'attachment; filename="{uuid}.csv"'
    assert response.content == b'a,b\r\n1,"x,y"\r\n2,\r\n'
    export_dir: Path = container.settings().export_dir
    assert (export_dir / f"{uuid}.csv").read_bytes() == response.content
    assert (await client.get(f"/workflow/{uuid}")).json()["status"] == "consumed"
    assert (await client.get("/workflow/consume")).status_code == 204


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_consume_takes_one_workflow_at_a_time_oldest_first(
    client: httpx.AsyncClient, method: str
) -> None:
    uuids = [(await post(client, f'{{"data": {{"i": {i}}}}}')).json()["uuid"] for i in range(3)]
    taken = [
        (await client.request(method, "/v1/workflow/consume")).headers["x-workflow-uuid"]
        for _ in range(3)
    ]
    assert taken == uuids


async def test_patch_to_consumed_takes_workflow_out_of_play(client: httpx.AsyncClient) -> None:
    uuid = (await post(client, '{"data": {"a": 1}}')).json()["uuid"]
    response = await client.patch(f"/workflow/{uuid}", json={"status": "consumed"})
    assert response.status_code == 200
    assert response.json()["status"] == "consumed"
    assert response.json()["updated_at"] >= response.json()["created_at"]
    assert (await client.get("/workflow/consume")).status_code == 204


async def test_patch_to_inserted_requeues_a_consumed_workflow(client: httpx.AsyncClient) -> None:
    uuid = (await post(client, '{"data": {"a": 1}}')).json()["uuid"]
    assert (await client.get("/workflow/consume")).status_code == 200
    response = await client.patch(f"/v1/workflow/{uuid}", json={"status": "inserted"})
    assert response.json()["status"] == "inserted"
    replay = await client.get("/workflow/consume")
    assert replay.headers["x-workflow-uuid"] == uuid
    assert (await client.get("/workflow/consume")).status_code == 204


async def test_patch_to_the_same_status_is_a_no_op_without_duplicate_enqueue(
    client: httpx.AsyncClient,
) -> None:
    created = (await post(client, '{"data": {"a": 1}}')).json()
    again = await client.patch(f"/workflow/{created['uuid']}", json={"status": "inserted"})
    assert again.status_code == 200
    assert again.json() == created
    assert (await client.get("/workflow/consume")).status_code == 200
    assert (await client.get("/workflow/consume")).status_code == 204


async def test_csv_of_any_workflow_changes_nothing(client: httpx.AsyncClient) -> None:
    uuid = (await post(client, '{"data": {"address": {"city": "Oslo"}}}')).json()["uuid"]
    response = await client.get(f"/workflow/{uuid}/csv")
    assert response.status_code == 200
    assert response.content == b"address.city\r\nOslo\r\n"
    assert response.headers["content-disposition"] == f'attachment; filename="{uuid}.csv"'
    assert (await client.get(f"/workflow/{uuid}")).json()["status"] == "inserted"


async def test_health_readiness_and_version(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "queue": "ok", "exports": "ok"}
    version = (await client.get("/v1/version")).json()
    assert set(version) == {"version", "commit"}
    assert version["version"]


async def test_not_ready_while_no_export_could_be_written(
    client: httpx.AsyncClient, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that can only answer every consume 503 is not ready; it is again once the
    directory is usable. The probe leaves nothing in it. The reason, which names the
    directory, is logged, not told to whoever asks (/readyz is public)."""
    exports = Path(settings.export_dir)
    _put_a_file_at(exports)
    workflow = (await post(client, '{"data": {"a": 1}}')).json()
    assert (await client.get("/workflow/consume")).status_code == 503
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="workflows.entrypoints.http")
    ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert ready.headers["retry-after"] == "2"
    assert ready.json() == {
        "status": "not ready",
        "checks": {"database": "ok", "queue": "ok", "exports": "unavailable"},
    }
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("readiness: the exports check failed")
    assert str(exports) in warnings[0]
    _remove(exports)
    assert (await client.get("/readyz")).status_code == 200
    assert _names_in(exports) == []  # made by the probe, and empty
    consumed = await client.get("/workflow/consume")
    assert consumed.headers["x-workflow-uuid"] == workflow["uuid"]


@pytest.mark.parametrize(
    ("failing", "status", "code"),
    [("repository", "not ready", 503), ("queue", "degraded", 200)],
)
async def test_readiness_names_the_failed_check_and_logs_why(
    client: httpx.AsyncClient,
    container: Container,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    failing: str,
    status: str,
    code: int,
) -> None:
    """The database failing is not ready; the queue alone (the broker: requests are
    served without it) is degraded, still 200, so traffic keeps coming."""
    reason = "AMQPConnectionError: ConnectionRefusedError(111) at 10.0.0.7:5672"

    async def unavailable() -> None:
        raise DependencyUnavailable("rabbitmq", reason)

    monkeypatch.setattr(getattr(container, failing)(), "ping", unavailable)
    caplog.set_level(logging.WARNING, logger="workflows.entrypoints.http")
    ready = await client.get("/readyz")
    assert ready.status_code == code
    assert ("retry-after" in ready.headers) == (code == 503)
    name = "database" if failing == "repository" else "queue"
    assert ready.json() == {
        "status": status,
        "checks": {"database": "ok", "queue": "ok", "exports": "ok"} | {name: "unavailable"},
    }
    assert "10.0.0.7" not in ready.text
    assert "ConnectionRefusedError" not in ready.text
    assert (await client.get("/readyz")).status_code == code  # a probe later: logged once
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [f"readiness: the {name} check failed: rabbitmq is unavailable: {reason}"]
    monkeypatch.undo()
    caplog.clear()
    caplog.set_level(logging.INFO, logger="workflows.entrypoints.http")
    assert (await client.get("/readyz")).json()["status"] == "ready"
    assert (await client.get("/readyz")).json()["status"] == "ready"
    assert [r.getMessage() for r in caplog.records] == [f"readiness: the {name} check passes again"]


async def test_readiness_waits_for_its_hanging_checks_side_by_side(
    client: httpx.AsyncClient,
    container: Container,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each check may wait up to its dependency's timeout (5 s for the database's pool and
    the broker's calls): with all three hanging, /readyz answers after one such wait, not
    after each in turn. Its body, status and log lines are what they are one at a time."""
    hang = 0.4

    def hanging(dependency: str) -> Callable[[], Awaitable[None]]:
        async def ping() -> None:
            await asyncio.sleep(hang)
            raise DependencyUnavailable(dependency, "no answer")

        return ping

    monkeypatch.setattr(container.repository(), "ping", hanging("database"))
    monkeypatch.setattr(container.queue(), "ping", hanging("rabbitmq"))
    monkeypatch.setattr(container.exporter(), "ping", hanging("export directory"))
    caplog.set_level(logging.WARNING, logger="workflows.entrypoints.http")
    started = time.monotonic()
    ready = await client.get("/readyz")
    took = time.monotonic() - started
    assert took < 2 * hang, f"{took:.2f} s: the checks waited in turn"
    assert ready.status_code == 503
    assert ready.json() == {
        "status": "not ready",
        "checks": {"database": "unavailable", "queue": "unavailable", "exports": "unavailable"},
    }
    assert sorted(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING) == [
        "readiness: the database check failed: database is unavailable: no answer",
        "readiness: the exports check failed: export directory is unavailable: no answer",
        "readiness: the queue check failed: rabbitmq is unavailable: no answer",
    ]


async def test_not_ready_until_the_export_files_are_checked(
    client: httpx.AsyncClient, container: Container, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(container.export_flusher(), "_recovered", False)
    ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["exports"] == RECOVERING  # a value openapi.yaml lists


def _put_a_file_at(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("a file where the directory should be")


def _remove(path: Path) -> None:
    path.unlink()


def _names_in(directory: Path) -> list[str]:
    return [entry.name for entry in directory.iterdir()]
