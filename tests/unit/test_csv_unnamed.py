"""Flush-behind writes make their file unnamed (`O_TMPFILE`) and link it in whole: a process
killed mid-write leaves nothing behind; where the filesystem refuses, a named temporary
file is renamed into place instead."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from workflows.adapters import csv_export
from workflows.adapters.csv_export import MARKER, CsvExporter
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
    assert csv_export._unnamed_files_work(str(tmp_path))
    assert os.listdir(tmp_path) == []  # the probe is gone


def test_a_process_killed_in_the_middle_of_a_write_leaves_no_file(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, os, signal, uuid
        from datetime import datetime, UTC
        from workflows.adapters import csv_export
        from workflows.domain.model import JsonDocument, Workflow

        def killed_mid_write(descriptor, content):
            os.write(descriptor, content[:3])
            os.kill(os.getpid(), signal.SIGKILL)

        async def main():
            now = datetime.now(UTC)
            exporter = csv_export.CsvExporter({str(tmp_path)!r})
            first = Workflow.new(uuid.uuid4(), JsonDocument('{{"a": 1}}'), (), now)
            await exporter.write(first, b"a\\r\\n1\\r\\n", now)
            print(first.uuid, flush=True)
            csv_export._write_all = killed_mid_write
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
        if refused == "open" and flags & csv_export._O_TMPFILE == csv_export._O_TMPFILE:
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
