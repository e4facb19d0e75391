"""Flush-behind writes make their file unnamed (`O_TMPFILE`) and link it in whole: a process
killed mid-write leaves nothing behind; where the filesystem refuses, a named temporary
file is renamed into place instead."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from workflows.adapters.csv_export import MARKER, CsvExporter, files
from workflows.domain.errors import DependencyUnavailable
from workflows.domain.model import JsonDocument, Workflow

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def workflow() -> Workflow:
    return Workflow.new(uuid.uuid4(), JsonDocument('{"a": 1}'), (), NOW)


def fresh(tmp_path: Path) -> CsvExporter:
    """An exporter whose writes are all fresh consumes: left to the flush."""
    return CsvExporter(tmp_path, wall_clock=lambda: NOW.timestamp())


def test_this_machine_gives_unnamed_files(tmp_path: Path) -> None:
    # The tests below are about that path: they must not pass by falling back.
    assert files.unnamed_files_work(str(tmp_path))
    assert os.listdir(tmp_path) == []  # the probe is gone


def test_a_process_killed_in_the_middle_of_a_write_leaves_no_file(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, os, signal, uuid
        from datetime import datetime, UTC
        from workflows.adapters.csv_export import CsvExporter, files
        from workflows.domain.model import JsonDocument, Workflow

        def killed_mid_write(descriptor, content):
            os.write(descriptor, content[:3])
            os.kill(os.getpid(), signal.SIGKILL)

        async def main():
            now = datetime.now(UTC)
            exporter = CsvExporter({str(tmp_path)!r})
            first = Workflow.new(uuid.uuid4(), JsonDocument('{{"a": 1}}'), (), now)
            await exporter.write(first, b"a\\r\\n1\\r\\n", now)
            print(first.uuid, flush=True)
            files._write_all = killed_mid_write
            second = Workflow.new(uuid.uuid4(), JsonDocument('{{"a": 2}}'), (), now)
            await exporter.write(second, b"a\\r\\n2\\r\\n", now)

        asyncio.run(main())
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == -9, done.stderr.decode()
    first = done.stdout.decode().strip()
    # The first file and the flush record; nothing of the second.
    assert sorted(os.listdir(tmp_path)) == sorted([MARKER, f"{first}.csv"])


async def test_a_fresh_write_makes_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = fresh(tmp_path)
    await exporter.write(workflow(), b"a\r\n0\r\n", NOW)  # the marker, and the probe
    renamed: list[str] = []
    real_replace = os.replace

    def replace(source: str, target: str) -> None:
        renamed.append(target)
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    item = workflow()
    await exporter.write(item, b"a\r\n1\r\n", NOW)
    assert renamed == []
    assert (tmp_path / f"{item.uuid}.csv").read_bytes() == b"a\r\n1\r\n"


async def test_a_fresh_write_replaces_an_existing_file(tmp_path: Path) -> None:
    exporter = fresh(tmp_path)
    item = workflow()
    await exporter.write(item, b"a\r\nold\r\n", NOW)
    await exporter.write(item, b"a\r\nnew\r\n", NOW)
    assert (tmp_path / f"{item.uuid}.csv").read_bytes() == b"a\r\nnew\r\n"
    assert sorted(os.listdir(tmp_path)) == sorted([MARKER, f"{item.uuid}.csv"])


async def test_a_failed_link_keeps_the_previous_file_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = fresh(tmp_path)
    item = workflow()
    await exporter.write(item, b"a\r\nold\r\n", NOW)

    def failing_replace(source: str, target: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(DependencyUnavailable, match="No space left"):
        await exporter.write(item, b"a\r\nnew\r\n", NOW)
    assert (tmp_path / f"{item.uuid}.csv").read_bytes() == b"a\r\nold\r\n"
    assert sorted(os.listdir(tmp_path)) == sorted([MARKER, f"{item.uuid}.csv"])

    def failing_link(source: str, target: str, **options: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", failing_link)
    other = workflow()
    with pytest.raises(DependencyUnavailable, match="No space left"):
        await exporter.write(other, b"a\r\n2\r\n", NOW)
    assert sorted(os.listdir(tmp_path)) == sorted([MARKER, f"{item.uuid}.csv"])


async def test_a_directory_removed_after_the_first_write_is_made_again(tmp_path: Path) -> None:
    directory = tmp_path / "exports"
    exporter = fresh(directory)
    await exporter.write(workflow(), b"a\r\n1\r\n", NOW)
    for name in os.listdir(directory):
        os.unlink(directory / name)
    directory.rmdir()
    item = workflow()
    await exporter.write(item, b"a\r\n2\r\n", NOW)
    assert (directory / f"{item.uuid}.csv").read_bytes() == b"a\r\n2\r\n"


@pytest.mark.parametrize("refused", ["open", "link"])
async def test_where_unnamed_files_are_refused_a_named_one_is_renamed_into_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused: str
) -> None:
    real_open, real_link = os.open, os.link

    def open_(path: str, flags: int, mode: int = 0o777) -> int:
        if refused == "open" and flags & files.O_TMPFILE == files.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_open(path, flags, mode)

    def link(source: str, target: str, **options: object) -> None:
        if refused == "link" and source.startswith("/proc/"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", source)
        real_link(source, target, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "link", link)
    renamed: list[str] = []
    real_replace = os.replace

    def replace(source: str, target: str) -> None:
        renamed.append(os.path.basename(target))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    exporter = fresh(tmp_path)
    first, second = workflow(), workflow()
    await exporter.write(first, b"a\r\n1\r\n", NOW)
    await exporter.write(second, b"a\r\n2\r\n", NOW)
    assert renamed == [MARKER, f"{first.uuid}.csv", f"{second.uuid}.csv"]
    assert (tmp_path / f"{second.uuid}.csv").read_bytes() == b"a\r\n2\r\n"
    assert sorted(os.listdir(tmp_path)) == sorted(
        [MARKER, f"{first.uuid}.csv", f"{second.uuid}.csv"]
    )


async def spares_of(exporter: CsvExporter, at_least: int = 16) -> files.SpareFiles:
    """The exporter's spare files, once its thread has opened `at_least` of them."""
    spares = exporter._spares
    assert spares is not None
    for _ in range(500):
        if spares.ready >= at_least:
            return spares
        await asyncio.sleep(0.01)
    raise AssertionError(f"only {spares.ready} spare files after 5 s")


def open_in(directory: Path) -> int:
    """How many of this process's descriptors are files in `directory` (spares among them:
    unnamed, they read as `directory/#inode (deleted)`)."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{name}").startswith(f"{directory}/")
    return count


async def test_files_are_opened_ahead_so_that_a_write_only_fills_and_links_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = fresh(tmp_path)
    first = workflow()
    await exporter.write(first, b"a\r\n0\r\n", NOW)  # the marker, the probe, the thread
    spares = await spares_of(exporter)
    before = spares.ready
    real_open = os.open
    loop_thread = threading.get_ident()

    def open_(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & files.O_TMPFILE == files.O_TMPFILE:
            assert threading.get_ident() != loop_thread, "the write opened its own file"
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", open_)
    items = [workflow() for _ in range(3)]
    for n, item in enumerate(items):
        await exporter.write(item, f"a\r\n{n}\r\n".encode(), NOW)
    assert before >= 16
    for n, item in enumerate(items):
        assert (tmp_path / f"{item.uuid}.csv").read_bytes() == f"a\r\n{n}\r\n".encode()
    names = [MARKER, f"{first.uuid}.csv", *(f"{item.uuid}.csv" for item in items)]
    assert sorted(os.listdir(tmp_path)) == sorted(names)
    exporter.close()


async def test_the_spares_are_topped_up_as_they_are_taken(tmp_path: Path) -> None:
    exporter = fresh(tmp_path)
    await exporter.write(workflow(), b"a\r\n0\r\n", NOW)
    await spares_of(exporter, at_least=32)
    for n in range(40):  # more than were ready
        await exporter.write(workflow(), f"a\r\n{n}\r\n".encode(), NOW)
    assert await spares_of(exporter, at_least=16)
    assert len(os.listdir(tmp_path)) == 42  # 41 files and the marker: no spare shows
    exporter.close()


async def test_a_spare_that_cannot_be_linked_in_gives_way_to_a_file_opened_then(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = fresh(tmp_path)
    await exporter.write(workflow(), b"a\r\n0\r\n", NOW)
    spares = await spares_of(exporter)
    real_link_in, linked = files._link_in, list[int]()

    def link_in(descriptor: int, path: str) -> None:
        if not linked:
            linked.append(descriptor)
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_link_in(descriptor, path)

    monkeypatch.setattr(files, "_link_in", link_in)
    item = workflow()
    await exporter.write(item, b"a\r\n1\r\n", NOW)
    assert (tmp_path / f"{item.uuid}.csv").read_bytes() == b"a\r\n1\r\n"
    assert linked  # the spare was tried first
    with pytest.raises(OSError, match="Bad file descriptor"):  # and closed, with the others
        os.fstat(linked[0])
    assert spares.ready < 16 or spares.filling
    exporter.close()


async def test_spares_failing_write_after_write_are_logged_when_it_starts_and_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On a full disk every write's spare fails (and the file opened instead, which makes
    its consume a 503, logged as such): one WARNING when that starts, not one per
    write, and one INFO, counted, once a spare works again."""
    exporter = fresh(tmp_path)
    await exporter.write(workflow(), b"a\r\n0\r\n", NOW)
    await spares_of(exporter)
    real_write_all, full = files._write_all, [True]

    def write_all(descriptor: int, content: bytes) -> None:
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_all(descriptor, content)

    monkeypatch.setattr(files, "_write_all", write_all)
    caplog.set_level(logging.INFO, logger="workflows.adapters.csv_export.files")
    for _ in range(10):  # a spare for every other one or so: one failing is thrown away
        with pytest.raises(DependencyUnavailable, match="No space left on device"):
            await exporter.write(workflow(), b"a\r\n1\r\n", NOW)
        await asyncio.sleep(0.01)  # time for the thread to open more
    full[0] = False
    await exporter.write(workflow(), b"a\r\n2\r\n", NOW)
    await spares_of(exporter)
    await exporter.write(workflow(), b"a\r\n3\r\n", NOW)  # with a spare
    logged = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert logged[0] == (
        "WARNING",
        "a spare unnamed file failed ([Errno 28] No space left on device): opening one instead",
    )
    assert [level for level, _ in logged] == ["WARNING", "INFO"]
    over = re.fullmatch(
        r"spare unnamed files work again, after (\d+) failures in [\d.]+ s \((\d+) not logged\)",
        logged[1][1],
    )
    assert over is not None, logged[1][1]
    failures, not_logged = map(int, over.groups())
    assert failures >= 3  # repeated, each counted
    assert not_logged == failures - 1
    exporter.close()


async def test_spares_survive_their_directory_being_removed_and_made_again(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "exports"
    exporter = fresh(directory)
    await exporter.write(workflow(), b"a\r\n1\r\n", NOW)
    await spares_of(exporter)
    for name in os.listdir(directory):
        os.unlink(directory / name)
    directory.rmdir()
    item = workflow()
    await exporter.write(item, b"a\r\n2\r\n", NOW)  # its spare cannot be linked: no directory
    assert (directory / f"{item.uuid}.csv").read_bytes() == b"a\r\n2\r\n"
    await exporter.write(workflow(), b"a\r\n2\r\n", NOW)  # asks the thread for more
    await spares_of(exporter)  # opened in the directory made again
    other = workflow()
    await exporter.write(other, b"a\r\n3\r\n", NOW)
    assert (directory / f"{other.uuid}.csv").read_bytes() == b"a\r\n3\r\n"
    exporter.close()


async def test_closing_the_exporter_stops_its_thread_and_closes_every_spare(
    tmp_path: Path,
) -> None:
    exporter = fresh(tmp_path)
    await exporter.write(workflow(), b"a\r\n1\r\n", NOW)
    spares = await spares_of(exporter, at_least=32)
    assert open_in(tmp_path) == 32
    exporter.close()
    assert not spares.filling
    assert spares.ready == 0
    assert open_in(tmp_path) == 0
    assert len(os.listdir(tmp_path)) == 2  # the file and the marker: spares leave nothing
