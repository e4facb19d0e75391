"""`CsvExporter`, the Exporter port over a directory: one `{uuid}.csv` per consumed
workflow, rendered by `render.py` and put in place by `files.py`.

What a power failure may leave is the flusher's business (`Exporter` port, README
*Guarantees*): a file written `LATE_AFTER` s or more after its consume began, or with no
consume time, is fsynced before its rename, as every file once was; any other is left to
`flush`, which runs `syncfs` on the directory's filesystem (one flush for every file
written since the last) and then records in `.flushed` the time it started. After a crash,
the files possibly torn are those of workflows whose consume began after `.flushed`'s time
less `LATE_AFTER` (`suspects`, from their modification times), and `repair` rewrites any
of them that is not what its data renders, with an fsync. OSError becomes
DependencyUnavailable.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

from workflows.adapters.csv_export import files, removal
from workflows.adapters.csv_export.fsync import Fsync
from workflows.adapters.csv_export.render import render_csv
from workflows.adapters.offload import offload
from workflows.application.ports import Exporter
from workflows.domain.errors import DependencyUnavailable, ExportFailed
from workflows.domain.model import Workflow

log = logging.getLogger(__name__)


LATE_AFTER = 10.0
"""Seconds after its consume began from which a file is fsynced before its rename rather
than left to `flush`: what the recovery's look-back allows for a slow consume."""
MTIME_SLACK = 2.0
"""Seconds allowed between a file's modification time and the flush it may have missed."""
MARKER = ".flushed"
PROBE_TIMEOUT = 5.0
"""Seconds a probe (a file made in the directory, in a thread) may take before the
directory counts as unavailable: `ping` fails, and so does every `write` while that probe
has still not returned."""
PROBE_EVERY = 5.0
"""Seconds between the probes `flush` starts (it runs every EXPORT_FLUSH_INTERVAL), so
that a filesystem that hangs is known before a consume writes there."""
RENDER_ON_LOOP_MAX = 8 * 1024
"""Characters of data text up to which a CSV is rendered on the event loop (about 1 ms of
it on a 2-core host); a larger document is rendered in a thread, so that one large export
does not hold up every other request of its process (a 1 MiB one takes 100-450 ms)."""
CELLS_ON_LOOP_MAX = 100_000
"""And up to which its `{` count (+ 1) times its `:` count, a bound on its CSV's cells, goes:
a short document of rows that each bring a key of their own (700 in 7.6 KB: 490,000 cells,
7.5 ms) is rendered in a thread too."""


class CsvExporter(Exporter):
    media_type = "text/csv; charset=utf-8"

    def __init__(
        self,
        export_dir: str | os.PathLike[str],
        *,
        flush_behind: bool = True,
        late_after: float = LATE_AFTER,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._dir = Path(export_dir)
        self._dir_name = os.fspath(export_dir)
        self._fsync = Fsync()
        # Whether the directory's filesystem gives unnamed files (None: not tried yet).
        self._unnamed: bool | None = None if files.O_TMPFILE else False
        self._flush_behind = flush_behind
        self._late_after = late_after
        self._time = wall_clock
        self._marked = False  # MARKER exists: any flush-behind write is after its time
        self._unflushed = False  # a file was left to `flush` since the last one began
        self._fsynced = False  # a file was written and fsynced since the last one began
        self._flushed_at: float | None = None  # MARKER's time, once read by unflushed_since
        self._spares: files.SpareFiles | None = None  # unnamed files opened ahead, once they work
        self._probing: asyncio.Future[None] | None = None  # the last probe's thread
        self._probe_began = 0.0  # when it began (time.monotonic)

    async def render(self, workflow: Workflow) -> bytes:
        text = workflow.data.text
        if (
            len(text) <= RENDER_ON_LOOP_MAX
            and (text.count("{") + 1) * text.count(":") <= CELLS_ON_LOOP_MAX
        ):
            return render_csv(text)  # a thread's hand-off would cost more than the render
        # The thread holds the GIL while it renders, but hands it to the loop every switch
        # interval (asgi.THREAD_SWITCH_INTERVAL): the other requests slow down, not stop.
        # One such thread for the process (`offload`): several would each take their share.
        return await offload(render_csv, text)

    async def write(
        self, workflow: Workflow, content: bytes, consumed_at: datetime | None = None
    ) -> None:
        if (held := self._held_for()) is not None:
            # A write there would hold the event loop, and every request of the process
            # with it, until the filesystem answers (README, *Observability*).
            raise DependencyUnavailable(
                "export directory", f"{self._dir}: a probe has not returned for {held:.0f} s"
            )
        target = f"{self._dir_name}/{workflow.uuid}.csv"
        late = (
            not self._flush_behind
            or consumed_at is None
            or self._time() - consumed_at.timestamp() >= self._late_after
        )
        try:
            if late:
                await files.replace_atomically(Path(target), content, self._fsync)
            else:
                if not self._marked:
                    await self._mark_if_missing()
                if self._unnamed is None:
                    self._unnamed = files.unnamed_files_work(self._dir_name)
                    if self._unnamed:
                        self._spares = files.SpareFiles(self._dir_name)
                        weakref.finalize(self, self._spares.close)
                if self._unnamed:
                    files.link_unnamed(self._dir_name, target, content, self._spares)
                else:
                    await files.replace_atomically(Path(target), content, None)
        except IsADirectoryError as error:
            # A directory where this workflow's file goes fails this workflow alone: as the
            # directory's fault it would answer 503 forever and hold up the queue behind it.
            raise ExportFailed(f"{target} is a directory: {error}") from error
        except OSError as error:
            raise DependencyUnavailable("export directory", f"{target}: {error}") from error
        if not late:
            # Set with no await since the rename: a flush that began before it sees it
            # next time; one that began after it covers the file.
            self._unflushed = True
        else:
            self._fsynced = True

    def close(self) -> None:
        if self._spares is not None:
            self._spares.close()

    async def flush(self) -> None:
        probing = self._probing
        if probing is None or (
            probing.done() and time.monotonic() - self._probe_began >= PROBE_EVERY
        ):
            self._probe()
        if not self._unflushed:
            if self._fsynced and self._marked:
                # Files written since, each fsynced before its consume answered (flush-behind
                # off, or late): none is left to check after a crash, so MARKER moves on.
                # It stood still, and every start looked at every workflow consumed since
                # the last one (6,000: 3 s before it served; a million, minutes).
                self._fsynced = False
                try:
                    await self._write_marker(self._time())
                except OSError as error:
                    self._fsynced = True
                    raise DependencyUnavailable(
                        "export directory", f"{self._dir}: {error}"
                    ) from error
            return
        self._unflushed = self._fsynced = False
        started = self._time()
        try:
            await asyncio.to_thread(files.sync_filesystem, self._dir)
            await self._write_marker(started)
        except OSError as error:
            self._unflushed = True
            raise DependencyUnavailable("export directory", f"{self._dir}: {error}") from error
        except BaseException:
            self._unflushed = True
            raise

    async def ping(self) -> None:
        """A file made in the directory within PROBE_TIMEOUT, in a thread. A filesystem
        that hangs (an NFS server gone) holds that thread, not the caller (/readyz): a
        probe still running is waited for (up to PROBE_TIMEOUT from its start), and once
        it is late a ping fails at once instead of holding another thread."""
        probing = self._probing
        if probing is not None and not probing.done():
            if self._held_for() is not None:
                raise DependencyUnavailable(
                    "export directory", f"{self._dir}: the last probe has not returned"
                )
            timeout = PROBE_TIMEOUT - (time.monotonic() - self._probe_began)
        else:
            probing, timeout = self._probe(), PROBE_TIMEOUT
        try:
            await asyncio.wait_for(asyncio.shield(probing), timeout)
        except TimeoutError:
            raise DependencyUnavailable(
                "export directory", f"{self._dir}: no answer within {PROBE_TIMEOUT:g} s"
            ) from None
        except OSError as error:
            raise DependencyUnavailable("export directory", f"{self._dir}: {error}") from error

    def _probe(self) -> asyncio.Future[None]:
        probing = asyncio.get_running_loop().run_in_executor(
            None, files.probe_directory, self._dir_name
        )
        probing.add_done_callback(_retrieved)  # its error may come after its caller left
        self._probing, self._probe_began = probing, time.monotonic()
        return probing

    def _held_for(self) -> float | None:
        """Seconds the running probe has taken, once past PROBE_TIMEOUT; else None."""
        probing = self._probing
        if probing is None or probing.done():
            return None
        held = time.monotonic() - self._probe_began
        return held if held >= PROBE_TIMEOUT else None

    async def unflushed_since(self) -> datetime | None:
        try:
            text = (self._dir / MARKER).read_text()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise DependencyUnavailable("export directory", f"{self._dir}: {error}") from error
        try:
            flushed_at = datetime.fromisoformat(text.strip()).timestamp()
        except ValueError:
            log.warning("%s holds %r, not a time: checking every export", MARKER, text[:40])
            flushed_at = 0.0
        self._flushed_at = flushed_at
        # What the crashed process left may still be only in the page cache (a process
        # crash, not a power failure): the first flush after the recovery covers it.
        self._unflushed = True
        return datetime.fromtimestamp(max(0.0, flushed_at - self._late_after - MTIME_SLACK), UTC)

    async def suspects(self, uuids: Collection[UUID]) -> list[UUID]:
        if self._flushed_at is None:
            raise RuntimeError("suspects() needs unflushed_since() first")
        written_after = self._flushed_at - MTIME_SLACK
        try:
            return await asyncio.to_thread(files.modified_after, self._dir, uuids, written_after)
        except OSError as error:
            raise DependencyUnavailable("export directory", f"{self._dir}: {error}") from error

    async def remove(self, uuids: Collection[UUID]) -> int:
        try:
            return await asyncio.to_thread(removal.remove_exports, self._dir, uuids)
        except OSError as error:
            raise DependencyUnavailable("export directory", f"{self._dir}: {error}") from error

    async def remove_older_than(self, before: datetime, *, dry_run: bool = False) -> int:
        try:
            return await asyncio.to_thread(
                removal.remove_older_than, self._dir, before.timestamp(), dry_run=dry_run
            )
        except OSError as error:
            raise DependencyUnavailable("export directory", f"{self._dir}: {error}") from error

    async def repair(self, workflow: Workflow, content: bytes) -> bool:
        target = self._dir / f"{workflow.uuid}.csv"
        try:
            try:
                if target.read_bytes() == content:
                    return False
            except FileNotFoundError:
                return False
            await files.replace_atomically(target, content, self._fsync)
        except OSError as error:
            raise DependencyUnavailable("export directory", f"{target}: {error}") from error
        return True

    async def _mark_if_missing(self) -> None:
        """Before the first file left to `flush`: MARKER must exist, so that a crash
        before the first flush still leaves a time to look back from."""
        if not (self._dir / MARKER).exists():
            await self._write_marker(self._time())
        self._marked = True

    async def _write_marker(self, flushed_at: float) -> None:
        text = datetime.fromtimestamp(flushed_at, UTC).isoformat() + "\n"
        await files.replace_atomically(self._dir / MARKER, text.encode(), self._fsync)
        self._marked = True


def _retrieved(future: asyncio.Future[None]) -> None:
    """Take a finished probe's outcome, so that an error no caller waited for is not
    reported as never retrieved (the next probe reports the directory's state)."""
    if not future.cancelled():
        future.exception()
