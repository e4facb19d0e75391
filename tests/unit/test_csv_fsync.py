"""The export's fsync: through Linux AIO (no thread), or in a thread where AIO is missing
or refused; either way before the rename, and a failure leaves nothing behind."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from workflows.adapters.csv_export import CsvExporter
from workflows.adapters.csv_export import fsync as fsync_module
from workflows.adapters.csv_export.fsync import AioContext
from workflows.domain.errors import DependencyUnavailable
from workflows.domain.model import JsonDocument, Workflow

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
Calls = list[tuple[str, object]]
real_aio_context = fsync_module.new_aio_context


def workflow() -> Workflow:
    return Workflow.new(uuid.uuid4(), JsonDocument("{}"), (), NOW)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


class Spy:
    """A real caio context (or `fsync`'s stand-in) that records each fsync."""

    def __init__(self, calls: Calls, fsync: object = None) -> None:
        self.calls = calls
        self.real = None if fsync else real_aio_context()  # its eventfd is a descriptor
        self.stand_in = fsync

    async def fsync(self, fd: int) -> object:
        self.calls.append(("aio fsync", os.readlink(f"/proc/self/fd/{fd}")))
        if callable(self.stand_in):
            return await self.stand_in(fd)
        assert self.real is not None
        return await self.real.fsync(fd)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    """Records os.fsync (with its thread) and os.replace, which still do their work."""
    recorded: Calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        recorded.append(("thread fsync", threading.get_ident()))
        real_fsync(fd)

    def replace(source: str, target: str) -> None:
        recorded.append(("replace", str(source)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return recorded


def use_context(monkeypatch: pytest.MonkeyPatch, make: object) -> None:
    monkeypatch.setattr(fsync_module, "new_aio_context", make)


async def test_the_fsync_goes_through_linux_aio_before_the_rename(
    tmp_path: Path, calls: Calls, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(calls)
    use_context(monkeypatch, lambda: spy)
    item = workflow()
    await CsvExporter(tmp_path).write(item, b"\r\n\r\n")
    (name, synced), (then, renamed) = calls  # no thread fsync: no Python thread ran
    assert (name, then) == ("aio fsync", "replace")
    assert synced == renamed, "the temporary file is the one synced, then renamed"
    assert (tmp_path / f"{item.uuid}.csv").read_bytes() == b"\r\n\r\n"


async def test_without_linux_aio_the_fsync_runs_in_a_thread_before_the_rename(
    tmp_path: Path, calls: Calls, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_aio() -> AioContext:
        raise ImportError("caio.linux_aio is not available on this platform")

    use_context(monkeypatch, no_aio)
    exporter = CsvExporter(tmp_path)
    for _ in range(2):
        await exporter.write(workflow(), b"\r\n\r\n")
    assert [name for name, _ in calls] == ["thread fsync", "replace"] * 2
    assert calls[0][1] != threading.get_ident(), "fsync ran on the loop"


async def test_a_filesystem_refusing_aio_fsync_gets_it_in_a_thread_from_then_on(
    tmp_path: Path, calls: Calls, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refused(fd: int) -> object:
        raise ValueError("The file descriptor specified in the first iocb is invalid [EINVAL]")

    use_context(monkeypatch, lambda: Spy(calls, refused))
    exporter = CsvExporter(tmp_path)
    before = open_descriptors()
    for _ in range(2):
        await exporter.write(workflow(), b"a\r\n")
    names = [name for name, _ in calls]
    assert names == ["aio fsync", "thread fsync", "replace", "thread fsync", "replace"]
    assert open_descriptors() == before
    assert len([name for name in os.listdir(tmp_path) if name.endswith(".csv")]) == 2


@pytest.mark.parametrize("path", ["aio", "thread"])
async def test_a_failed_fsync_leaves_no_file_and_no_open_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    async def failing(fd: int) -> object:
        raise SystemError("Input/output error")  # what caio raises for a failed operation

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    if path == "aio":
        use_context(monkeypatch, lambda: Spy([], failing))
    else:
        use_context(monkeypatch, lambda: (_ for _ in ()).throw(OSError("no AIO")))
        monkeypatch.setattr(os, "fsync", failing_fsync)
    before = open_descriptors()
    with pytest.raises(DependencyUnavailable, match="Input/output error"):
        await CsvExporter(tmp_path).write(workflow(), b"\r\n\r\n")
    assert os.listdir(tmp_path) == []
    assert open_descriptors() == before


async def test_a_write_cancelled_during_its_aio_fsync_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = asyncio.Event()

    async def slow(fd: int) -> object:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("never set")

    use_context(monkeypatch, lambda: Spy([], slow))
    before = open_descriptors()
    task = asyncio.create_task(CsvExporter(tmp_path).write(workflow(), b"a\r\n"))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert os.listdir(tmp_path) == []
    assert open_descriptors() == before


async def test_each_event_loop_gets_its_own_aio_context(tmp_path: Path) -> None:
    exporter = CsvExporter(tmp_path)
    await exporter.write(workflow(), b"a\r\n")

    def in_another_loop() -> None:
        asyncio.run(exporter.write(workflow(), b"b\r\n"))

    await asyncio.to_thread(in_another_loop)  # would hang if the first loop's were reused
    await exporter.write(workflow(), b"c\r\n")
    contents = sorted((tmp_path / name).read_bytes() for name in os.listdir(tmp_path))
    assert contents == [b"a\r\n", b"b\r\n", b"c\r\n"]
