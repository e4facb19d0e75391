"""`workflows prune`: the use case over the in-memory repository and a real export
directory, what it removes from that directory, and its command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from workflows.adapters.csv_export import CsvExporter
from workflows.adapters.csv_export.removal import remove_older_than
from workflows.adapters.memory import InMemoryWorkflowRepository
from workflows.application.pruning import Pruned, PruneWorkflows
from workflows.domain.ids import uuid7
from workflows.domain.model import JsonDocument, Workflow, WorkflowStatus
from workflows.entrypoints import cli
from workflows.entrypoints import container as container_module
from workflows.entrypoints.config import ConfigError, Settings
from workflows.entrypoints.container import Container, running
from workflows.entrypoints.operations import age

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
NOW = T0 + timedelta(days=40)


async def stored(repository: InMemoryWorkflowRepository, consumed: datetime | None) -> Workflow:
    workflow = Workflow.new(uuid7(), JsonDocument('{"a":1}'), (), T0)
    await repository.add(workflow)
    if consumed is not None:
        await repository.set_status(workflow.uuid, WorkflowStatus.CONSUMED, consumed)
    return workflow


def exported(directory: Path, workflow: Workflow, written: float) -> Path:
    path = directory / f"{workflow.uuid}.csv"
    path.write_bytes(b"a\n1\n")
    os.utime(path, (written, written))
    return path


def csv_files(directory: Path) -> list[str]:
    return [path.name for path in directory.glob("*.csv")]


async def test_workflows_consumed_before_the_age_go_with_their_exports_batch_by_batch(
    tmp_path: Path,
) -> None:
    repository = InMemoryWorkflowRepository()
    old = [await stored(repository, T0 + timedelta(hours=n)) for n in range(5)]
    recent = await stored(repository, NOW - timedelta(days=1))
    queued = await stored(repository, None)
    for workflow in (*old[:4], recent):  # old[4] has no file (removed earlier, say)
        exported(tmp_path, workflow, time.time())
    prune = PruneWorkflows(repository, CsvExporter(tmp_path), lambda: NOW, batch=2)

    dry = await prune(workflows_older_than=timedelta(days=30), dry_run=True)
    assert dry == Pruned(workflows=5, their_exports=0, exports=0)
    assert len(csv_files(tmp_path)) == 5

    done = await prune(workflows_older_than=timedelta(days=30))
    assert done == Pruned(workflows=5, their_exports=4, exports=0)
    for workflow in old:
        assert await repository.get(workflow.uuid) is None
    assert await repository.get(recent.uuid) is not None
    assert await repository.get(queued.uuid) == queued
    assert csv_files(tmp_path) == [f"{recent.uuid}.csv"]
    assert await prune(workflows_older_than=timedelta(days=30)) == Pruned(0, 0, 0)


async def test_exports_older_than_the_age_go_and_their_workflows_stay(tmp_path: Path) -> None:
    repository = InMemoryWorkflowRepository()
    workflow = await stored(repository, T0)
    now = time.time()
    old = exported(tmp_path, workflow, now - 3 * 86400)
    young = exported(tmp_path, await stored(repository, T0), now - 3600)
    exporter = CsvExporter(tmp_path)
    prune = PruneWorkflows(repository, exporter, lambda: datetime.fromtimestamp(now, UTC))

    assert await prune(exports_older_than=timedelta(days=2), dry_run=True) == Pruned(0, 0, 1)
    assert old.exists()
    assert await prune(exports_older_than=timedelta(days=2)) == Pruned(0, 0, 1)
    assert not old.exists()
    assert young.exists()
    assert await repository.get(workflow.uuid) is not None


def test_only_exports_and_left_over_temporary_files_are_removed(tmp_path: Path) -> None:
    uuid = uuid7()
    ours = [
        f"{uuid}.csv",
        f".{uuid}.csv.0123456789abcdef.tmp",  # a write interrupted before its rename
        "..flushed.fedcba9876543210.tmp",  # the marker's, likewise
    ]
    theirs = [
        ".flushed",
        "notes.txt",
        f"{uuid}.csv.bak",
        f"{str(uuid).upper()}.csv",
        f".{uuid}.csv.tmp",
        "x.csv",
    ]
    long_ago = time.time() - 86400
    for name in ours + theirs:
        (tmp_path / name).write_text("x")
        os.utime(tmp_path / name, (long_ago, long_ago))
    (tmp_path / f"{uuid7()}.csv").mkdir()  # not a file
    os.symlink(tmp_path / "notes.txt", tmp_path / f"{uuid7()}.csv")  # nor a link

    assert remove_older_than(tmp_path, time.time(), dry_run=True) == len(ours)
    assert remove_older_than(tmp_path, long_ago) == 0  # nothing written before then
    assert remove_older_than(tmp_path, time.time()) == len(ours)
    left = {path.name for path in tmp_path.iterdir()}
    assert left.isdisjoint(ours)
    assert left.issuperset(theirs)
    assert len(left) == len(theirs) + 2
    assert remove_older_than(tmp_path / "missing", time.time()) == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0s", timedelta(0)),
        ("90s", timedelta(seconds=90)),
        ("30m", timedelta(minutes=30)),
        ("12h", timedelta(hours=12)),
        (" 30d ", timedelta(days=30)),
    ],
)
def test_an_age_is_a_whole_number_and_a_unit(text: str, expected: timedelta) -> None:
    assert age(text) == expected


@pytest.mark.parametrize("text", ["30", "30 d", "1.5h", "-1d", "d", "30w", "36501d", ""])
def test_anything_else_is_not_an_age(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        age(text)


def test_the_command_line_refuses_what_it_cannot_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("QUEUE_BACKEND", "memory")
    monkeypatch.setenv("EXPORT_DIR", str(tmp_path / "exports"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["prune"])
    assert exit_.value.code == 2
    assert "prune needs --workflows-older-than, --exports-older-than or both" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit) as exit_:
        cli.main(["prune", "--workflows-older-than", "30"])
    assert exit_.value.code == 2
    assert "'30' is not an age: give a whole number and a unit" in capsys.readouterr().err

    assert cli.main(["prune", "--workflows-older-than", "30d"]) == 2
    assert "QUEUE_BACKEND=memory keeps its workflows inside" in capsys.readouterr().err
    (tmp_path / "exports").mkdir()
    old = tmp_path / "exports" / f"{uuid7()}.csv"
    old.write_text("a\n")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert cli.main(["prune", "--exports-older-than", "1h"]) == 0
    said = capsys.readouterr().out
    assert said == f"exports    deleted 1 files written more than 1h ago ({tmp_path}/exports)\n"
    assert not old.exists()
    assert not (tmp_path / "var").exists(), "exports alone need no (embedded) database"


async def test_retention_settings_prune_in_each_round_of_a_process_housekeeping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(container_module, "HOUSEKEEPING_EVERY", 0.05)
    caplog.set_level(logging.INFO, logger="workflows.entrypoints.container")
    settings = Settings(
        queue_backend="memory",
        export_dir=tmp_path,
        retain_consumed=timedelta(0),
        retain_exports=timedelta(hours=1),
    )
    container = Container(settings=settings)
    async with running(container):
        create = container.create_workflow()
        taken = (await create(JsonDocument('{"a":1}'), ())).workflow
        queued = (await create(JsonDocument('{"a":2}'), ())).workflow
        consumed = await container.consume_workflow()()
        assert consumed is not None
        assert consumed.workflow.uuid == taken.uuid
        other = Workflow.new(uuid7(), JsonDocument('{"b":1}'), (), T0)
        stale = exported(tmp_path, other, time.time() - 7200)
        fresh = exported(tmp_path, Workflow.new(uuid7(), JsonDocument("{}"), (), T0), time.time())
        repository = container.repository()
        for _ in range(100):  # the next round, within 0.05 s
            if await repository.get(taken.uuid) is None and not stale.exists():
                break
            await asyncio.sleep(0.05)
        assert await repository.get(taken.uuid) is None
        assert await repository.get(queued.uuid) == queued
    assert csv_files(tmp_path) == [fresh.name]
    said = [record.getMessage() for record in caplog.records]
    assert (
        "retention: deleted 1 workflows consumed more than 0s ago, and 1 export files of theirs"
        in said
    )
    assert "retention: deleted 1 export files written more than 1h ago" in said


@pytest.mark.parametrize("name", ["RETAIN_CONSUMED", "RETAIN_EXPORTS"])
def test_a_retention_is_an_age_or_nothing(name: str) -> None:
    assert getattr(Settings.from_env({}), name.lower()) is None
    assert getattr(Settings.from_env({name: " "}), name.lower()) is None
    assert getattr(Settings.from_env({name: "30d"}), name.lower()) == timedelta(days=30)
    with pytest.raises(ConfigError, match=f"{name}: '30' is not an age"):
        Settings.from_env({name: "30"})


@pytest.mark.parametrize("backend", ["postgres", "rabbitmq"])
def test_exports_alone_are_pruned_without_a_database_url(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    backend: str,
) -> None:
    """README: `--exports-older-than` needs no database. Without DATABASE_URL the command
    built the PostgreSQL repository all the same, and ended in a traceback."""
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("QUEUE_BACKEND", backend)
    monkeypatch.setenv("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:1/%2F")
    (tmp_path / "exports").mkdir()
    monkeypatch.setenv("EXPORT_DIR", str(tmp_path / "exports"))
    old = tmp_path / "exports" / f"{uuid7()}.csv"
    old.write_text("a\n")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert cli.main(["prune", "--exports-older-than", "1h", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("exports    would delete 1 files")
    assert cli.main(["prune", "--exports-older-than", "1h"]) == 0
    assert not old.exists()
    assert not (tmp_path / "var").exists(), "no embedded database either"
