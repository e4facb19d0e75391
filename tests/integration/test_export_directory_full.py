"""The export directory on a real full filesystem, a small tmpfs: its probe (/readyz), and
the log of the writes and flushes that fail while it is full."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import unavailable
from workflows.adapters.csv_export import CsvExporter, files
from workflows.adapters.memory import InMemoryWorkflowRepository
from workflows.application.flusher import ExportFlusher
from workflows.domain.errors import DependencyUnavailable
from workflows.domain.model import JsonDocument, Workflow


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        unavailable("mounting a tmpfs", RuntimeError(mounted.stderr.strip()))
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


def fill(directory: Path) -> None:
    filler = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(filler, b"x" * 4096):
            pass
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
    finally:
        os.close(filler)


def test_the_probe_fails_on_a_full_filesystem_and_passes_once_there_is_room(
    small_filesystem: Path,
) -> None:
    """An empty unnamed file needs an inode only: the probe writes a byte, which needs a
    block, so a filesystem out of space reads as unavailable (every consume would 503)."""
    exports = str(small_filesystem / "exports")
    files.probe_directory(exports)
    fill(small_filesystem)
    with pytest.raises(OSError, match="No space left on device") as refused:
        files.probe_directory(exports)
    assert refused.value.errno == errno.ENOSPC
    os.remove(small_filesystem / "filler")
    files.probe_directory(exports)
    assert os.listdir(exports) == []  # the probe leaves nothing


async def test_a_full_filesystem_is_logged_when_it_starts_and_when_it_is_over(
    small_filesystem: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """While it is full, every consume's write fails (its 503 is logged with it) and so
    does the flush every interval: the spare files and the flusher each log one WARNING
    as it starts, not one per write or per second, and one INFO when it is over."""
    exporter = CsvExporter(small_filesystem / "exports")
    flusher = ExportFlusher(
        InMemoryWorkflowRepository(), exporter, interval=0.05, needs_recovery=False
    )

    async def write() -> None:
        now = datetime.now(UTC)
        workflow = Workflow.new(uuid.uuid4(), JsonDocument('{"a":1}'), (), now)
        await exporter.write(workflow, b"a\r\n1\r\n", now)

    await write()  # the marker, and the spare files' thread
    await asyncio.sleep(0.2)
    fill(small_filesystem)
    caplog.set_level(logging.INFO, logger="workflows")
    flushing = asyncio.create_task(flusher.run())
    try:
        for _ in range(20):  # a second of consumes
            with pytest.raises(DependencyUnavailable, match="No space left on device"):
                await write()
            await asyncio.sleep(0.05)
        os.remove(small_filesystem / "filler")
        for _ in range(10):
            await write()
            await asyncio.sleep(0.05)
    finally:
        flushing.cancel()
        await asyncio.gather(flushing, return_exceptions=True)
        exporter.close()
    logged = Counter((r.name.rsplit(".", 1)[-1], r.levelname) for r in caplog.records)
    assert logged == {
        ("files", "WARNING"): 1,
        ("files", "INFO"): 1,
        ("flusher", "WARNING"): 1,
        ("flusher", "INFO"): 1,
    }, [r.getMessage() for r in caplog.records]
