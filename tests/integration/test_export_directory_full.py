"""The export directory's probe (/readyz) on a real full filesystem: a small tmpfs."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import unavailable
from workflows.adapters.csv_export import files


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
