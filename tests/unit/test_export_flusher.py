"""ExportFlusher: after a crash, the consumes' files a flush had not covered are checked and
the torn ones rewritten; only then does the flush record move on."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

import pytest

from workflows.adapters.csv_export import MARKER, CsvExporter
from workflows.adapters.memory import InMemoryQueue, InMemoryWorkflowRepository
from workflows.application.flusher import ExportFlusher
from workflows.application.use_cases import ConsumeWorkflow
from workflows.domain.errors import DependencyUnavailable
from workflows.domain.ids import uuid7
from workflows.domain.model import JsonDocument, Workflow, WorkflowStatus


def utc_now() -> datetime:
    return datetime.now(UTC)


class Service:
    """What one process holds: an exporter and a consume use case, lost with the process.
    The repository outlives it, as PostgreSQL would."""

    def __init__(self, repository: InMemoryWorkflowRepository, export_dir: Path) -> None:
        self.repository = repository
        self.queue = InMemoryQueue(repository)
        self.exporter = CsvExporter(export_dir)
        self.consume = ConsumeWorkflow(self.queue, self.exporter, utc_now)

    async def consumed(self) -> Workflow:
        oldest = await self.repository.list(status=WorkflowStatus.INSERTED, after=None, limit=1)
        await self.queue.enqueued(oldest[0])  # an in-memory queue starts empty in each process
        consumed = await self.consume()
        assert consumed is not None
        return consumed.workflow


async def submit(repository: InMemoryWorkflowRepository, count: int) -> None:
    for index in range(count):
        await repository.add(Workflow.new(uuid7(), JsonDocument(f'{{"n":{index}}}'), (), utc_now()))


def marker(directory: Path) -> str:
    return (directory / MARKER).read_text()


async def test_a_restart_rewrites_the_torn_files_written_since_the_last_flush(
    tmp_path: Path,
) -> None:
    repository = InMemoryWorkflowRepository()
    await submit(repository, 4)
    before = Service(repository, tmp_path)
    flushed = [await before.consumed() for _ in range(2)]
    await before.exporter.flush()
    unflushed = [await before.consumed() for _ in range(2)]
    # The process dies, then the power: the files the flush had not covered are torn.
    (tmp_path / f"{unflushed[0].uuid}.csv").write_bytes(b"")
    (tmp_path / f"{unflushed[1].uuid}.csv").write_bytes(b"n\r")

    after = Service(repository, tmp_path)
    assert await ExportFlusher(repository, after.exporter).recover() == 2
    for workflow in flushed + unflushed:
        path = tmp_path / f"{workflow.uuid}.csv"
        assert path.read_bytes() == await after.exporter.render(workflow)
    assert await ExportFlusher(repository, Service(repository, tmp_path).exporter).recover() == 0


async def test_files_older_than_the_last_flush_are_not_even_read(tmp_path: Path) -> None:
    repository = InMemoryWorkflowRepository()
    await submit(repository, 1)
    before = Service(repository, tmp_path)
    workflow = await before.consumed()
    path = tmp_path / f"{workflow.uuid}.csv"
    long_ago = path.stat().st_mtime - 60
    os.utime(path, (long_ago, long_ago))  # written a minute before the flush below
    await before.exporter.flush()
    path.write_bytes(b"")  # what no crash can do to a flushed file, kept by its old time:
    os.utime(path, (long_ago, long_ago))  # so a recovery that still read it would show

    after = Service(repository, tmp_path)
    assert await ExportFlusher(repository, after.exporter).recover() == 0
    assert path.read_bytes() == b""


class DownRepository(InMemoryWorkflowRepository):
    def __init__(self) -> None:
        super().__init__()
        self.down = True

    async def consumed_since(self, since: datetime) -> list[UUID]:
        if self.down:
            raise DependencyUnavailable("database", "down")
        return await super().consumed_since(since)


async def test_the_flush_record_waits_for_the_recovery(tmp_path: Path) -> None:
    repository = DownRepository()
    await submit(repository, 3)
    before = Service(repository, tmp_path)
    await before.consumed()
    recorded = marker(tmp_path)

    after = Service(repository, tmp_path)
    flusher = ExportFlusher(repository, after.exporter, interval=0.01)
    task = asyncio.create_task(flusher.run())
    try:
        await after.consumed()  # a file for the flusher, while recovery cannot run
        await asyncio.sleep(0.2)
        assert marker(tmp_path) == recorded, "moved on before the recovery"
        await flusher.close()
        assert marker(tmp_path) == recorded, "close flushed before the recovery"
        repository.down = False
        for _ in range(200):
            if marker(tmp_path) != recorded:
                break
            await asyncio.sleep(0.01)
        assert marker(tmp_path) != recorded
        recorded = marker(tmp_path)
        await after.consumed()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0.01)  # the records' times are a wall clock's
    await flusher.close()
    assert marker(tmp_path) > recorded, "close flushes what is left"


@pytest.mark.parametrize("data", ["[1, 2]", '"text"'])
async def test_a_workflow_that_cannot_be_rendered_is_skipped(tmp_path: Path, data: str) -> None:
    repository = InMemoryWorkflowRepository()
    poison = Workflow.new(uuid7(), JsonDocument(data), (), utc_now())
    await repository.add(poison)
    (tmp_path / f"{poison.uuid}.csv").write_bytes(b"whatever")
    exporter = CsvExporter(tmp_path)
    await exporter.write(poison, b"whatever", utc_now())  # makes the marker
    assert await ExportFlusher(repository, CsvExporter(tmp_path)).recover() == 0


class FullDiskExporter(CsvExporter):
    """Its first `full_for` flushes fail, as on a filesystem out of space."""

    def __init__(self, export_dir: Path, full_for: int) -> None:
        super().__init__(export_dir)
        self.full_for = full_for
        self.flushes = 0

    async def flush(self) -> None:
        self.flushes += 1
        if self.flushes <= self.full_for:
            raise DependencyUnavailable("export directory", "[Errno 28] No space left on device")
        await super().flush()


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not within 5 s")


async def test_a_failure_that_repeats_every_interval_is_logged_when_it_starts_and_ends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The recovery retried while the database is away, then a flush a second on a full
    disk: each logs one WARNING as it starts and one INFO, counted, when it is over, not
    a WARNING each time."""
    repository = DownRepository()
    await submit(repository, 1)
    await Service(repository, tmp_path).consumed()  # the marker: something to recover
    exporter = FullDiskExporter(tmp_path, full_for=10)
    flusher = ExportFlusher(repository, exporter, interval=0.01)
    caplog.set_level(logging.INFO, logger="workflows.application.flusher")
    task = asyncio.create_task(flusher.run())
    try:
        await asyncio.sleep(0.1)  # about ten tries of the recovery
        repository.down = False
        await until(lambda: exporter.flushes >= 12)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    logged = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in logged] == ["WARNING", "INFO", "WARNING", "INFO"]
    assert logged[0][1] == "export recovery postponed: database is unavailable: down"
    assert logged[1][1].startswith("export recovery ran, after ")
    assert logged[2][1] == (
        "export flush failed, retrying: "
        "export directory is unavailable: [Errno 28] No space left on device"
    )
    assert logged[3][1].startswith("export flush works again, after 10 failures in ")
