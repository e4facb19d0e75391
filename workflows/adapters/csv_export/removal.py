"""Removing exports (`workflows prune`): the files of given workflows, or every export
older than a time. Only what this package makes is touched: `{uuid}.csv`, and the
temporary files of writes that were interrupted (files.py's `_temporary_name`); the
`.flushed` marker and anything else in the directory stay.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Collection
from pathlib import Path
from uuid import UUID


def remove_exports(directory: Path, uuids: Collection[UUID]) -> int:
    """Remove `{uuid}.csv` of each of these workflows; how many there were."""
    removed = 0
    for uuid in uuids:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / f"{uuid}.csv")
            removed += 1
    return removed


_EXPORT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\.csv")
_LEFT_OVER = re.compile(rf"\.(?:{_EXPORT.pattern}|\.flushed)\.[0-9a-f]{{16}}\.tmp")


def remove_older_than(directory: Path, before: float, *, dry_run: bool = False) -> int:
    """Remove the exports of `directory` last modified before `before` (a time.time()),
    and the temporary files of writes that were interrupted; how many files (with
    `dry_run`, how many would go, removing nothing). A missing directory holds none."""
    removed = 0
    try:
        entries = os.scandir(directory)
    except FileNotFoundError:
        return 0
    with entries:
        for entry in entries:
            if not (_EXPORT.fullmatch(entry.name) or _LEFT_OVER.fullmatch(entry.name)):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                if entry.stat(follow_symlinks=False).st_mtime >= before:
                    continue
                if not dry_run:
                    os.unlink(entry.path)
            except FileNotFoundError:  # removed meanwhile (another prune)
                continue
            removed += 1
    return removed
