"""Poison workflows: an export that keeps failing is dead-lettered after N attempts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from workflows.adapters.csv_export import CsvExporter
from workflows.domain.errors import DependencyUnavailable
from workflows.domain.model import Workflow
from workflows.entrypoints.config import Settings
from workflows.entrypoints.container import Container, sweep_dead_letters


class PoisonExporter(CsvExporter):
    """Fails on any workflow whose data has a "poison" key."""

    def __init__(self, export_dir: Path, error: Exception) -> None:
        super().__init__(export_dir)
        self.error = error

    async def render(self, workflow: Workflow) -> bytes:
        if '"poison"' in workflow.data.text:
            raise self.error
        return await super().render(workflow)


@pytest.fixture
def poisoned(container: Container, tmp_path: Path) -> PoisonExporter:
    exporter = PoisonExporter(tmp_path / "exports", ValueError("cannot render"))
    container.consume_workflow().exporter = exporter
    return exporter


async def consume_errors(client: httpx.AsyncClient, times: int) -> list[int]:
    return [(await client.get("/workflow/consume")).status_code for _ in range(times)]


async def test_poison_workflow_is_dead_lettered_after_five_failures(
    client: httpx.AsyncClient, poisoned: PoisonExporter
) -> None:
    poison = (await client.post("/workflow", json={"data": {"poison": 1}})).json()["uuid"]
    healthy = (await client.post("/workflow", json={"data": {"fine": 1}})).json()["uuid"]
    assert await consume_errors(client, 5) == [500] * 5
    after = await client.get("/workflow/consume")
    assert after.headers["x-workflow-uuid"] == healthy

    stored = (await client.get(f"/workflow/{poison}")).json()
    assert stored["status"] == "inserted"
    assert stored["delivery_attempts"] == 5
    assert stored["dead_lettered_at"] is not None
    dead = (await client.get("/workflow?dead_lettered=true")).json()
    assert [w["uuid"] for w in dead] == [poison]


async def test_patch_to_inserted_requeues_a_dead_letter(
    client: httpx.AsyncClient, poisoned: PoisonExporter, container: Container, tmp_path: Path
) -> None:
    poison = (await client.post("/workflow", json={"data": {"poison": 1}})).json()["uuid"]
    await consume_errors(client, 5)
    assert (await client.get("/workflow/consume")).status_code == 204
    container.consume_workflow().exporter = CsvExporter(tmp_path / "exports")  # fixed
    revived = await client.patch(f"/workflow/{poison}", json={"status": "inserted"})
    assert revived.json()["delivery_attempts"] == 0
    assert revived.json()["dead_lettered_at"] is None
    assert (await client.get("/workflow/consume")).headers["x-workflow-uuid"] == poison


async def test_an_unavailable_export_directory_counts_no_attempt(
    client: httpx.AsyncClient, container: Container, tmp_path: Path
) -> None:
    container.consume_workflow().exporter = PoisonExporter(
        tmp_path, DependencyUnavailable("export directory", "disk full")
    )
    uuid = (await client.post("/workflow", json={"data": {"poison": 1}})).json()["uuid"]
    assert await consume_errors(client, 7) == [503] * 7
    stored = (await client.get(f"/workflow/{uuid}")).json()
    assert (stored["delivery_attempts"], stored["dead_lettered_at"]) == (0, None)


async def test_a_directory_where_a_file_goes_dead_letters_that_workflow_alone(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    """Not the export directory's fault (503 for ever, the queue held up behind it): that
    workflow's failed consumes, counted like a poison workflow's."""
    blocked = (await client.post("/workflow", json={"data": {"a": 1}})).json()["uuid"]
    healthy = (await client.post("/workflow", json={"data": {"b": 2}})).json()["uuid"]
    _make_directory(Path(settings.export_dir) / f"{blocked}.csv")
    assert await consume_errors(client, 5) == [500] * 5
    assert (await client.get("/workflow/consume")).headers["x-workflow-uuid"] == healthy
    stored = (await client.get(f"/workflow/{blocked}")).json()
    assert (stored["status"], stored["delivery_attempts"]) == ("inserted", 5)
    assert stored["dead_lettered_at"] is not None


def _make_directory(path: Path) -> None:
    path.mkdir(parents=True)


async def test_bad_dead_lettered_filter_is_422(client: httpx.AsyncClient) -> None:
    response = await client.get("/workflow?dead_lettered=maybe")
    assert response.status_code == 422
    assert response.json()["errors"][0]["pointer"] == "/query/dead_lettered"


async def test_a_dead_letter_sweep_skipped_while_the_broker_is_away_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The sweep runs every few seconds: an outage of minutes is one WARNING when it starts
    and one INFO when it is over, not a line per attempt."""
    caplog.set_level(logging.INFO, logger="workflows.entrypoints.container")
    outcomes: list[Exception | None] = [DependencyUnavailable("rabbitmq", "gone")] * 3 + [
        None,
        None,
    ]
    done = asyncio.Event()

    async def sweep(now: datetime) -> int:
        outcome = outcomes.pop(0)
        if not outcomes:
            done.set()
        if outcome is not None:
            raise outcome
        return 0

    task = asyncio.create_task(sweep_dead_letters(sweep, interval=0.001))
    await asyncio.wait_for(done.wait(), 5)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    said = [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if r.name == "workflows.entrypoints.container"
    ]
    assert [level for level, _ in said] == ["WARNING", "INFO"]
    assert "dead-letter sweep skipped: rabbitmq is unavailable: gone" in said[0][1]
    assert "dead-letter sweep runs again" in said[1][1]
