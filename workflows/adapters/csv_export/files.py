"""The export files on disk: each put in place whole, at once.

A file is written to a temporary one and renamed (or linked) over `{uuid}.csv`, so readers
and a process crash never see a partial file. A file left to the flush (`exporter.py`) is
written unnamed (`O_TMPFILE`) and linked in: a process killed mid-write leaves nothing,
and one directory entry is made instead of two (in-process, 80-85 → 45-54 µs of CPU per
file). The unnamed files are opened ahead by a thread (`SpareFiles`): making the inode is
the dearest part of an export, and the event loop only writes and links. Where the
filesystem has no unnamed files (NFS, no /proc), and for a file fsynced before it appears,
a named temporary file (`.{uuid}.csv.{random}.tmp`, removed on failure) is renamed over it
instead.

The directory is not fsynced: a lost rename only loses the file, which is a pure function
of the stored data and can be downloaded again.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import secrets
import threading
from collections import deque
from collections.abc import Callable, Collection
from pathlib import Path
from uuid import UUID

from workflows.adapters.csv_export.fsync import Fsync
from workflows.application.outages import Outage

log = logging.getLogger(__name__)


async def replace_atomically(target: Path, content: bytes, fsync: Fsync | None) -> None:
    """Write `content` to a temporary file, fsync it (unless `fsync` is None), rename it
    over `target`.

    The short system calls run on the event loop; only the fsync, which waits for the
    disk, leaves it (`Fsync`). Without it nothing here awaits."""
    temporary = _temporary_name(os.fspath(target))
    # os.open, not mkstemp: the file gets the umask's permissions, not 0600.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        descriptor = os.open(temporary, flags, 0o666)
    except FileNotFoundError:  # the directory is made on first use (or after removal)
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(temporary, flags, 0o666)
    try:
        try:
            _write_all(descriptor, content)
        except BaseException:
            os.close(descriptor)
            raise
        if fsync is None:
            os.close(descriptor)
        else:
            await fsync.sync_and_close(descriptor)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


O_TMPFILE = getattr(os, "O_TMPFILE", 0)


def link_unnamed(
    directory: str, target: str, content: bytes, spares: SpareFiles | None = None
) -> None:
    """Write `content` to an unnamed file in `directory` (`O_TMPFILE`) and link it in as
    `target` whole, replacing any file there: the flush-behind write, all on the loop.

    One directory entry is made instead of a temporary one made, then renamed; a process
    killed in the middle leaves no file at all, where a named temporary file would stay.
    The file is one of `spares`, opened ahead by their thread, when one is ready; a spare
    that cannot be linked in (its directory was removed and made again on another
    filesystem, say) throws the others away, and a file opened now is tried instead."""
    if spares is not None and (spare := spares.take()) is not None:
        try:
            _write_and_link(spare, target, content)
        except OSError as error:
            # Logged when it starts and when it is over: with the disk full, every write
            # would say so, while its consume answers 503 (which is logged).
            spares.failing.failed(f"[Errno {error.errno}] {error.strerror}")
            spares.discard()
        else:
            spares.failing.passed()
            return
    flags = os.O_WRONLY | O_TMPFILE
    try:
        descriptor = os.open(directory, flags, 0o666)
    except FileNotFoundError:  # the directory was removed since it was made
        os.makedirs(directory, exist_ok=True)
        descriptor = os.open(directory, flags, 0o666)
    _write_and_link(descriptor, target, content)


def _write_and_link(descriptor: int, target: str, content: bytes) -> None:
    """Fill the unnamed file `descriptor` and link it in as `target`; close it. Over an
    existing `target` (a workflow consumed again) the file is linked in under a temporary
    name and renamed over it."""
    try:
        _write_all(descriptor, content)
        try:
            _link_in(descriptor, target)
        except FileExistsError:
            temporary = _temporary_name(target)
            _link_in(descriptor, temporary)
            try:
                os.replace(temporary, target)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary)
                raise
    finally:
        os.close(descriptor)


class SpareFiles:
    """Unnamed files (`O_TMPFILE`) opened ahead in `directory` by a thread of their own,
    for consumes to fill and link in.

    Making the file's inode is most of what an export costs the event loop, and on some
    hosts far more than the rest (`open` with `O_TMPFILE` took 40 % of a consuming worker's
    samples; bench/notes.md): here the loop only writes and links. The thread keeps up to
    `keep` files ready, topping up whenever fewer than half are left. An unused spare is
    nothing on disk: it goes with its descriptor (`close`, or the process's end)."""

    def __init__(self, directory: str, keep: int = 32) -> None:
        self._directory = directory
        self._keep = keep
        self._ready: deque[int] = deque()
        self._wanted = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.failing = Outage(
            log,
            "a spare unnamed file failed (%s): opening one instead",
            "spare unnamed files work again",
        )
        """Spares that cannot be filled or linked in, logged once while it lasts."""

    @property
    def ready(self) -> int:
        return len(self._ready)

    @property
    def filling(self) -> bool:
        """Whether the thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def take(self) -> int | None:
        """A ready file's descriptor (the caller closes it), or None if none is ready."""
        try:
            descriptor: int | None = self._ready.popleft()
        except IndexError:
            descriptor = None
        if len(self._ready) < self._keep // 2 and not self._closed:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._fill, name="export-spares", daemon=True
                )
                self._thread.start()
            self._wanted.set()
        return descriptor

    def discard(self) -> None:
        """Close every ready file; the thread opens new ones."""
        while True:
            try:
                os.close(self._ready.popleft())
            except IndexError:
                return

    def close(self) -> None:
        """Stop the thread and close the ready files."""
        self._closed = True
        self._wanted.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.discard()

    def _fill(self) -> None:
        flags = os.O_WRONLY | O_TMPFILE
        while True:
            self._wanted.wait()
            self._wanted.clear()
            while len(self._ready) < self._keep and not self._closed:
                try:
                    self._ready.append(os.open(self._directory, flags, 0o666))
                except OSError as error:  # the consume's own open will say what is wrong
                    log.debug("no spare unnamed file in %s: %s", self._directory, error)
                    break
            if self._closed:
                return


def _link_in(descriptor: int, path: str) -> None:
    """linkat(2) of the open file itself, following /proc's link to it. Given a directory
    descriptor, os.link calls linkat with AT_SYMLINK_FOLLOW (plain link(2), which it calls
    otherwise, would link the /proc entry, refused as EXDEV); with an absolute source
    path the kernel ignores that descriptor."""
    os.link(f"/proc/self/fd/{descriptor}", path, src_dir_fd=descriptor)


def unnamed_files_work(directory: str) -> bool:
    """Whether `directory`'s filesystem makes `O_TMPFILE` files and they can be linked in
    through /proc (not on NFS, or without /proc): tried once per exporter."""
    try:
        os.makedirs(directory, exist_ok=True)
        descriptor = os.open(directory, os.O_WRONLY | O_TMPFILE, 0o666)
    except OSError as error:
        log.info("no unnamed files in %s (%s): using named temporary files", directory, error)
        return False
    probe = _temporary_name(f"{directory}/probe")
    try:
        _link_in(descriptor, probe)
        os.unlink(probe)
    except OSError as error:
        log.info(
            "unnamed files in %s cannot be linked in (%s): using named temporary files",
            directory,
            error,
        )
        return False
    finally:
        os.close(descriptor)
    return True


def probe_directory(directory: str) -> None:
    """Raise OSError unless a file could be made in `directory` now (made if missing, as
    an export makes it): an unnamed file with one byte in it (a data block: a full
    filesystem refuses it with ENOSPC, where an empty file needs only an inode), closed,
    which leaves nothing on disk; where there are none, the directory's permissions say."""
    os.makedirs(directory, exist_ok=True)
    if O_TMPFILE:
        try:
            probe = os.open(directory, os.O_WRONLY | O_TMPFILE, 0o666)
            try:
                os.write(probe, b"\n")
            finally:
                os.close(probe)
            return
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise  # the others: a filesystem (or kernel) without unnamed files
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "cannot make files here", directory)


def _temporary_name(target: str) -> str:
    head, name = os.path.split(target)
    return os.path.join(head, f".{name}.{secrets.token_hex(8)}.tmp")


def modified_after(directory: Path, uuids: Collection[UUID], after: float) -> list[UUID]:
    found = []
    for uuid in uuids:
        try:
            modified = os.stat(directory / f"{uuid}.csv").st_mtime
        except FileNotFoundError:
            continue
        if modified >= after:
            found.append(uuid)
    return found


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError):  # not Linux (or no glibc symbol)
        return None
    syncfs.argtypes = [ctypes.c_int]
    syncfs.restype = ctypes.c_int
    return syncfs


_syncfs = _load_syncfs()


def sync_filesystem(directory: Path) -> None:
    """Flush the filesystem that holds `directory`: syncfs(2), or sync(2) where there is
    none. Since Linux 5.8 syncfs reports a writeback error of any file on it."""
    if _syncfs is None:
        os.sync()
        return
    try:
        descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:  # nothing was ever written there
        return
    try:
        if _syncfs(descriptor) != 0:
            number = ctypes.get_errno()
            raise OSError(number, os.strerror(number))
    finally:
        os.close(descriptor)


def _write_all(descriptor: int, content: bytes) -> None:
    view = memoryview(content)
    while view:
        view = view[os.write(descriptor, view) :]
