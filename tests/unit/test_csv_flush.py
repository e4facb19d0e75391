"""Flush-behind exports: a consume's file is flushed by the next `flush` (one syncfs for all
files since the last), not by an fsync of its own; after a crash the files a flush may have
missed are found and the torn ones rewritten."""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from workflows.adapters.csv_export import LATE_AFTER, MARKER, MTIME_SLACK, CsvExporter, files
from workflows.adapters.csv_export.fsync import Fsync
from workflows.domain.errors import DependencyUnavailable
from workflows.domain.model import JsonDocument, Workflow

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
Events = list[str]


def workflow() -> Workflow:
    return Workflow.new(uuid.uuid4(), JsonDocument('{"a": 1}'), (), NOW)


class WallClock:
    def __init__(self, now: datetime) -> None:
        self.now = now.timestamp()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> Events:
    """Records each file's fsync (by its path) and each filesystem flush; both still run."""
    recorded: Events = []
    real_sync_and_close = Fsync.sync_and_close
    real_sync_filesystem = files.sync_filesystem

    async def sync_and_close(self: Fsync, descriptor: int) -> None:
        name = os.path.basename(os.readlink(f"/proc/self/fd/{descriptor}"))
        recorded.append(f"fsync {name[1:].rsplit('.', 2)[0]}")  # ".{name}.{random}.tmp"
        await real_sync_and_close(self, descriptor)

    def sync_filesystem(directory: Path) -> None:
        recorded.append("syncfs")
        real_sync_filesystem(directory)

    monkeypatch.setattr(Fsync, "sync_and_close", sync_and_close)
    monkeypatch.setattr(files, "sync_filesystem", sync_filesystem)
    return recorded


def marker_time(directory: Path) -> datetime:
    return datetime.fromisoformat((directory / MARKER).read_text().strip())


async def test_a_fresh_consume_leaves_its_file_to_the_flush_after_marking_the_directory(
    tmp_path: Path, events: Events
) -> None:
    clock = WallClock(NOW + timedelta(seconds=1))
    exporter = CsvExporter(tmp_path, wall_clock=clock)
    first, second = workflow(), workflow()
    await exporter.write(first, b"a\r\n1\r\n", NOW)
    await exporter.write(second, b"a\r\n2\r\n", NOW)
    # The marker is written (and fsynced) once, before the first file left to a flush.
    assert events == [f"fsync {MARKER}"]
    assert marker_time(tmp_path) == NOW + timedelta(seconds=1)
    assert (tmp_path / f"{first.uuid}.csv").read_bytes() == b"a\r\n1\r\n"
    assert (tmp_path / f"{second.uuid}.csv").read_bytes() == b"a\r\n2\r\n"
    assert sorted(os.listdir(tmp_path)) == sorted(
        [MARKER, f"{first.uuid}.csv", f"{second.uuid}.csv"]
    )


@pytest.mark.parametrize(
    ("consumed_at", "flush_behind"),
    [(None, True), (NOW - timedelta(seconds=LATE_AFTER), True), (NOW, False)],
    ids=["no consume time", "a late write", "flush-behind off"],
)
async def test_these_writes_are_fsynced_before_their_rename(
    tmp_path: Path, events: Events, consumed_at: datetime | None, flush_behind: bool
) -> None:
    exporter = CsvExporter(tmp_path, flush_behind=flush_behind, wall_clock=WallClock(NOW))
    item = workflow()
    await exporter.write(item, b"a\r\n", consumed_at)
    assert events == [f"fsync {item.uuid}.csv"]
    await exporter.flush()
    assert events == [f"fsync {item.uuid}.csv"], "nothing was left to flush"
    assert not (tmp_path / MARKER).exists()


async def test_a_flush_syncs_the_filesystem_once_then_records_when_it_began(
    tmp_path: Path, events: Events, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = WallClock(NOW)
    exporter = CsvExporter(tmp_path, wall_clock=clock)
    for _ in range(3):
        await exporter.write(workflow(), b"a\r\n", NOW)
    clock.now += 5
    recording_sync = files.sync_filesystem

    def slow_sync(directory: Path) -> None:
        recording_sync(directory)
        clock.now += 1  # a file written meanwhile is after the time recorded

    monkeypatch.setattr(files, "sync_filesystem", slow_sync)
    await exporter.flush()
    assert events == [f"fsync {MARKER}", "syncfs", f"fsync {MARKER}"]
    assert marker_time(tmp_path) == NOW + timedelta(seconds=5)
    clock.now += 5
    await exporter.flush()
    assert events == [f"fsync {MARKER}", "syncfs", f"fsync {MARKER}"], "nothing new: no flush"
    assert marker_time(tmp_path) == NOW + timedelta(seconds=5)


async def test_a_failed_flush_keeps_the_record_and_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = WallClock(NOW)
    exporter = CsvExporter(tmp_path, wall_clock=clock)
    await exporter.write(workflow(), b"a\r\n", NOW)

    def failing(directory: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(files, "sync_filesystem", failing)
    clock.now += 5
    with pytest.raises(DependencyUnavailable, match="Input/output error"):
        await exporter.flush()
    assert marker_time(tmp_path) == NOW
    monkeypatch.undo()
    clock.now += 5
    await exporter.flush()
    assert marker_time(tmp_path) == NOW + timedelta(seconds=10)


async def test_the_filesystem_flush_is_a_real_syncfs(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x")
    files.sync_filesystem(tmp_path)  # raises OSError if syncfs fails
    files.sync_filesystem(tmp_path / "never-made")  # nothing written there: nothing to do
    assert files._syncfs is not None, "Linux has syncfs(2)"


async def test_without_a_marker_nothing_was_left_to_a_flush(tmp_path: Path) -> None:
    assert await CsvExporter(tmp_path).unflushed_since() is None
    assert await CsvExporter(tmp_path / "never-made").unflushed_since() is None


async def test_the_look_back_allows_for_late_writes(tmp_path: Path) -> None:
    (tmp_path / MARKER).write_text(NOW.isoformat() + "\n")
    since = await CsvExporter(tmp_path).unflushed_since()
    assert since == NOW - timedelta(seconds=LATE_AFTER + MTIME_SLACK)


async def test_an_unreadable_marker_makes_every_export_a_suspect(tmp_path: Path) -> None:
    (tmp_path / MARKER).write_text("garbage\n")
    exporter = CsvExporter(tmp_path)
    assert await exporter.unflushed_since() == datetime.fromtimestamp(0, UTC)
    item = workflow()
    (tmp_path / f"{item.uuid}.csv").write_bytes(b"")
    os.utime(tmp_path / f"{item.uuid}.csv", (1, 1))
    assert await exporter.suspects([item.uuid]) == [item.uuid]


async def test_suspects_are_the_files_modified_since_the_last_flush_began(tmp_path: Path) -> None:
    flushed_at = datetime.now(UTC).timestamp() - 60
    (tmp_path / MARKER).write_text(datetime.fromtimestamp(flushed_at, UTC).isoformat())
    before, within_slack, after, missing = (workflow() for _ in range(4))
    for item, modified in [
        (before, flushed_at - MTIME_SLACK - 1),
        (within_slack, flushed_at - MTIME_SLACK + 0.5),
        (after, flushed_at + 1),
    ]:
        path = tmp_path / f"{item.uuid}.csv"
        path.write_bytes(b"a\r\n")
        os.utime(path, (modified, modified))
    exporter = CsvExporter(tmp_path)
    with pytest.raises(RuntimeError):
        await exporter.suspects([after.uuid])
    await exporter.unflushed_since()
    uuids = [before.uuid, within_slack.uuid, after.uuid, missing.uuid]
    assert await exporter.suspects(uuids) == [within_slack.uuid, after.uuid]


async def test_repair_rewrites_a_torn_file_durably_and_leaves_others_alone(
    tmp_path: Path, events: Events
) -> None:
    exporter = CsvExporter(tmp_path)
    torn, empty, whole, missing = (workflow() for _ in range(4))
    (tmp_path / f"{torn.uuid}.csv").write_bytes(b"a\r")
    (tmp_path / f"{empty.uuid}.csv").write_bytes(b"")
    (tmp_path / f"{whole.uuid}.csv").write_bytes(b"a\r\n1\r\n")
    assert await exporter.repair(torn, b"a\r\n1\r\n") is True
    assert await exporter.repair(empty, b"a\r\n1\r\n") is True
    assert await exporter.repair(whole, b"a\r\n1\r\n") is False
    assert await exporter.repair(missing, b"a\r\n1\r\n") is False
    assert events == [f"fsync {torn.uuid}.csv", f"fsync {empty.uuid}.csv"]
    for item in (torn, empty, whole):
        assert (tmp_path / f"{item.uuid}.csv").read_bytes() == b"a\r\n1\r\n"
    assert not (tmp_path / f"{missing.uuid}.csv").exists(), "maybe another replica's: not made"


async def test_with_every_file_fsynced_each_flush_moves_the_marker_on(
    tmp_path: Path, events: Events
) -> None:
    """EXPORT_FLUSH_INTERVAL=0 after a run with flush-behind (the marker there): the marker
    moved only once per start, so each start checked every workflow consumed since the
    previous one (an audit: 6,000 consumes, 3 s before the process served)."""
    clock = WallClock(NOW)
    exporter = CsvExporter(tmp_path, flush_behind=False, wall_clock=clock)
    (tmp_path / MARKER).write_text((NOW - timedelta(days=1)).isoformat() + "\n")
    assert await exporter.unflushed_since() is not None  # the start's recovery reads it
    await exporter.flush()  # ...and its first flush covers what the last process left
    assert marker_time(tmp_path) == NOW
    for step in (1, 2):
        clock.now += 10
        item = workflow()
        await exporter.write(item, b"a\r\n", NOW)
        assert events[-1] == f"fsync {item.uuid}.csv"
        await exporter.flush()
        assert events[-1] == f"fsync {MARKER}", "no syncfs: each file was fsynced"
        assert marker_time(tmp_path) == NOW + timedelta(seconds=10 * step)
    clock.now += 10
    await exporter.flush()  # nothing written since: the marker stays
    assert marker_time(tmp_path) == NOW + timedelta(seconds=20)
    assert "syncfs" not in events[1:]
