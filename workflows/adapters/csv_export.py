"""CSV export: one row per object, nested objects flattened to dotted column names.

docs/csv.md describes the format for users, with examples. Where the contract is silent:

- Numbers are copied from the document's text: the characters of each JSON number
  token (`2.50`, `1E+400`, `-0`, a 5000-digit integer), never reformatted. Parsing keeps
  the tokens as text (`parse_int`/`parse_float`) rather than building Decimals to print
  again: the text cannot drift from the stored document, which the API returns as is.
- Arrays, and empty objects, are one cell of compact JSON: numbers as in the text, strings as
  UTF-8 with only the escapes JSON requires (`json.dumps(ensure_ascii=False)`).
- An empty object at the top gives a row with no cells: an empty header line and an
  empty line (`\\r\\n\\r\\n`). An empty array gives the empty header line alone. A row
  whose only cell is empty is written `""`, so it never reads as a blank line.
- When the first column name starts with U+FEFF, every header name is quoted, so the
  file never starts with the bytes of a byte order mark.
- Strings, header names included, that start with `=`, `+`, `-`, `@`, TAB or CR get a
  `'` in front. Numbers, booleans and JSON cells never do.
- Column names are unique in the written header: the name of a path is its keys joined
  with `.`, neutralised as above; a name already taken gets `~2`, or the first unused
  `~N`. Duplicate keys in one object (intake refuses them): the last value wins.
- Intake also refuses lone surrogates; should one get here, it becomes U+FFFD, as UTF-8
  cannot hold it. A document that is not an object or an array of objects, or that
  holds `NaN` or `Infinity`, raises ValueError.
- `write` puts a complete file in place of `{uuid}.csv` at once, so readers and a process
  crash never see a partial file. A file left to `flush` (below) is written unnamed
  (`O_TMPFILE`) and linked in: a process killed mid-write leaves nothing, and one
  directory entry is made instead of two (in-process, 80-85 → 45-54 µs of CPU per file).
  The unnamed files are opened ahead by a thread (`SpareFiles`): making the inode is the
  dearest part of an export, and the event loop only writes and links.
  Where the filesystem has no unnamed files (NFS, no /proc), and for a file fsynced before
  it appears, a named temporary file (`.{uuid}.csv.{random}.tmp`, removed on failure) is
  renamed over it instead. What a power failure may leave is the flusher's business
  (`Exporter` port, README *Guarantees*): a file written `LATE_AFTER` s or more after its
  consume began, or with no consume time, is fsynced before its rename, as every file once
  was; any other is left to `flush`, which runs `syncfs` on the directory's filesystem
  (one flush for every file written since the last) and then records in `.flushed` the
  time it started. After a
  crash, the files possibly torn are those of workflows whose consume began after
  `.flushed`'s time less `LATE_AFTER` (`suspects`, from their modification times), and
  `repair` rewrites any of them that is not what its data renders, with an fsync.
  The fsyncs go through the kernel's asynchronous I/O (`IOCB_CMD_FSYNC`, with caio): the
  kernel's own workers run the same fsync and wake the event loop when it is done, so no
  Python thread takes the GIL for it (bench/notes.md has what that saved). Where that is
  not available (another OS, no AIO context to spare, a filesystem that refuses), the
  fsync runs in a thread.
  The directory is not fsynced: a lost rename only loses the file, which is a pure
  function of the stored data and can be downloaded again. OSError becomes
  DependencyUnavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import ctypes
import io
import json
import logging
import os
import re
import secrets
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, Protocol
from uuid import UUID

import orjson

from workflows.application.ports import Exporter
from workflows.domain.errors import DependencyUnavailable
from workflows.domain.model import Workflow

log = logging.getLogger(__name__)

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_json_string = json.JSONEncoder(ensure_ascii=False).encode


LATE_AFTER = 10.0
"""Seconds after its consume began from which a file is fsynced before its rename rather
than left to `flush`: what the recovery's look-back allows for a slow consume."""
MTIME_SLACK = 2.0
"""Seconds allowed between a file's modification time and the flush it may have missed."""
MARKER = ".flushed"


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
        self._unnamed: bool | None = None if _O_TMPFILE else False
        self._flush_behind = flush_behind
        self._late_after = late_after
        self._time = wall_clock
        self._marked = False  # MARKER exists: any flush-behind write is after its time
        self._unflushed = False  # a file was left to `flush` since the last one began
        self._flushed_at: float | None = None  # MARKER's time, once read by unflushed_since
        self._spares: SpareFiles | None = None  # unnamed files opened ahead, once they work

    def render(self, workflow: Workflow) -> bytes:
        return _render(workflow.data.text)

    async def write(
        self, workflow: Workflow, content: bytes, consumed_at: datetime | None = None
    ) -> None:
        target = f"{self._dir_name}/{workflow.uuid}.csv"
        late = (
            not self._flush_behind
            or consumed_at is None
            or self._time() - consumed_at.timestamp() >= self._late_after
        )
        try:
            if late:
                await _replace_atomically(Path(target), content, self._fsync)
            else:
                if not self._marked:
                    await self._mark_if_missing()
                if self._unnamed is None:
                    self._unnamed = _unnamed_files_work(self._dir_name)
                    if self._unnamed:
                        self._spares = SpareFiles(self._dir_name)
                        weakref.finalize(self, self._spares.close)
                if self._unnamed:
                    _link_unnamed(self._dir_name, target, content, self._spares)
                else:
                    await _replace_atomically(Path(target), content, None)
        except OSError as error:
            raise DependencyUnavailable("export directory", f"{target}: {error}") from error
        if not late:
            # Set with no await since the rename: a flush that began before it sees it
            # next time; one that began after it covers the file.
            self._unflushed = True

    def close(self) -> None:
        if self._spares is not None:
            self._spares.close()

    async def flush(self) -> None:
        if not self._unflushed:
            return
        self._unflushed = False
        started = self._time()
        try:
            await asyncio.to_thread(_sync_filesystem, self._dir)
            await self._write_marker(started)
        except OSError as error:
            self._unflushed = True
            raise DependencyUnavailable("export directory", f"{self._dir}: {error}") from error
        except BaseException:
            self._unflushed = True
            raise

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
            return await asyncio.to_thread(_modified_after, self._dir, uuids, written_after)
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
            await _replace_atomically(target, content, self._fsync)
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
        await _replace_atomically(self._dir / MARKER, text.encode(), self._fsync)
        self._marked = True


async def _replace_atomically(target: Path, content: bytes, fsync: Fsync | None) -> None:
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


_O_TMPFILE = getattr(os, "O_TMPFILE", 0)


def _link_unnamed(
    directory: str, target: str, content: bytes, spares: SpareFiles | None = None
) -> None:
    """Write `content` to an unnamed file in `directory` (`O_TMPFILE`) and link it in as
    `target` whole, replacing any file there: the flush-behind write, all on the loop.

    One directory entry is made instead of a temporary one made, then renamed; a process
    killed in the middle leaves no file at all, where a named temporary file would stay.
    The file is one of `spares`, opened ahead by their thread, when one is ready; a spare
    that cannot be linked in (its directory was removed and made again on another
    filesystem, say) throws the others away, and a file opened now is tried instead."""
    spare = spares.take() if spares is not None else None
    if spare is not None:
        try:
            _write_and_link(spare, target, content)
            return
        except OSError as error:
            assert spares is not None
            log.info("a spare unnamed file failed (%s): opening one instead", error)
            spares.discard()
    flags = os.O_WRONLY | _O_TMPFILE
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
        flags = os.O_WRONLY | _O_TMPFILE
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


def _unnamed_files_work(directory: str) -> bool:
    """Whether `directory`'s filesystem makes `O_TMPFILE` files and they can be linked in
    through /proc (not on NFS, or without /proc): tried once per exporter."""
    try:
        os.makedirs(directory, exist_ok=True)
        descriptor = os.open(directory, os.O_WRONLY | _O_TMPFILE, 0o666)
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


def _temporary_name(target: str) -> str:
    head, name = os.path.split(target)
    return os.path.join(head, f".{name}.{secrets.token_hex(8)}.tmp")


def _modified_after(directory: Path, uuids: Collection[UUID], after: float) -> list[UUID]:
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


def _sync_filesystem(directory: Path) -> None:
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


class AioContext(Protocol):
    """What is used of caio's AsyncioContext."""

    def fsync(self, fd: int) -> Awaitable[object]: ...


class Fsync:
    """fsync a descriptor, then close it, without blocking the event loop.

    Through Linux AIO where it can (`IOCB_CMD_FSYNC`: the kernel's workers run the same
    `vfs_fsync` as fsync(2), then signal an eventfd the loop watches); else in a thread.
    A thread costs the loop a GIL hand-over and a wake-up per file; with AIO no Python
    thread runs. One AIO context per event loop, made on first use."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._context: AioContext | None = None
        self._threads_only = False

    async def sync_and_close(self, descriptor: int) -> None:
        context = self._aio_context()
        if context is not None and await self._through_aio(context, descriptor):
            return
        # The thread closes the descriptor: even if this task is cancelled meanwhile, the
        # descriptor is never closed (and its number reused) under the thread's feet.
        await asyncio.to_thread(_sync_and_close, descriptor)

    async def _through_aio(self, context: AioContext, descriptor: int) -> bool:
        """True once synced and closed; False, the descriptor still open, when the
        filesystem refuses an AIO fsync."""
        try:
            await context.fsync(descriptor)
        except ValueError as error:  # refused at submission; caio names the errno
            if "[EINVAL]" in str(error):
                log.info("no AIO fsync on this filesystem (%s); using a thread", error)
                self._threads_only = True
                return False
            os.close(descriptor)
            raise OSError(str(error)) from error
        except SystemError as error:  # the fsync itself failed; caio gives its strerror
            os.close(descriptor)
            raise OSError(str(error)) from error
        except BaseException:
            # Safe even while a cancelled AIO fsync still runs: the kernel holds its own
            # reference to the open file, not to the descriptor's number.
            os.close(descriptor)
            raise
        os.close(descriptor)
        return True

    def _aio_context(self) -> AioContext | None:
        if self._threads_only:
            return None
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            try:
                self._context = new_aio_context()
            except Exception as error:  # not Linux, no AIO, no context to spare
                log.info("no Linux AIO for fsync (%s); using a thread", error)
                self._threads_only = True
                return None
            self._loop = loop
        return self._context


def new_aio_context() -> AioContext:
    """A caio Linux AIO context on the running loop (few requests: one per file in flight)."""
    from caio.linux_aio_asyncio import AsyncioContext

    context: AioContext = AsyncioContext(max_requests=128)  # type: ignore[no-untyped-call]
    return context


def _sync_and_close(descriptor: int) -> None:
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class _Raw(str):
    """JSON text to copy as it is: a number token as the document writes it, or punctuation."""


def _not_json(constant: str) -> NoReturn:
    raise ValueError(f"{constant} is not JSON")


def _render(text: str) -> bytes:
    document = json.loads(text, parse_int=_Raw, parse_float=_Raw, parse_constant=_not_json)
    rows = document if isinstance(document, list) else [document]
    if not all(isinstance(row, dict) for row in rows):
        raise ValueError("a CSV export needs a JSON object or an array of objects")
    columns = _Columns()
    root = _Path("", "")
    flat_rows = [_flatten(row, root, columns) for row in rows]
    return _utf8(_csv_text(columns.names, flat_rows))


def _csv_text(names: list[str], flat_rows: list[list[tuple[int, str]]]) -> str:
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\r\n")  # QUOTE_MINIMAL, quotes doubled
    if names and names[0].startswith("\ufeff"):
        # Quoted, so that the file never opens with what readers take for a byte order
        # mark (and strip).
        csv.writer(out, lineterminator="\r\n", quoting=csv.QUOTE_ALL).writerow(names)
    else:
        writer.writerow(names)
    for cells in flat_rows:
        line = [""] * len(names)
        for column, cell in cells:
            line[column] = cell
        writer.writerow(line)
    return out.getvalue()


class _Path:
    """A key path, in a trie of every path seen: finding a column costs O(1) per key."""

    __slots__ = ("_prefix", "children", "column", "name")

    def __init__(self, name: str, prefix: str) -> None:
        self.name = name
        self._prefix = prefix
        self.children: dict[str, _Path] = {}
        self.column: int | None = None

    def child(self, key: str) -> _Path:
        child = self.children.get(key)
        if child is None:
            name = self._prefix + key
            child = self.children[key] = _Path(name, name + ".")
        return child


class _Columns:
    """Header names in order of first appearance, each unique in the written header."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._taken: set[str] = set()
        self._next_suffix: dict[str, int] = {}

    def add(self, path_name: str) -> int:
        name = _neutralise(path_name)
        if name in self._taken:
            # Names are never released, so every suffix below the memo is still taken.
            suffix = self._next_suffix.get(name, 2)
            while f"{name}~{suffix}" in self._taken:
                suffix += 1
            self._next_suffix[name] = suffix + 1
            name = f"{name}~{suffix}"
        self._taken.add(name)
        self.names.append(name)
        return len(self.names) - 1


def _flatten(row: dict[str, Any], root: _Path, columns: _Columns) -> list[tuple[int, str]]:
    """The row's (column, cell) pairs, depth first in key order. A loop, not recursion,
    so any nesting the JSON parser accepted renders too."""
    cells: list[tuple[int, str]] = []
    stack = [(root, iter(row.items()))]
    while stack:
        path, items = stack[-1]
        for key, value in items:
            child = path.child(key)
            if isinstance(value, dict) and value:
                stack.append((child, iter(value.items())))
                break
            if child.column is None:
                child.column = columns.add(child.name)
            cells.append((child.column, _cell(value)))
        else:
            stack.pop()
    return cells


def _cell(value: object) -> str:
    if value is None:
        return ""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, _Raw):
        return value
    if isinstance(value, str):
        return _neutralise(value)
    return _compact_json(value)


def _neutralise(text: str) -> str:
    """Prefix `'` so that a spreadsheet shows the text rather than run it as a formula."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


_COMMA = _Raw(",")
_CLOSE_ARRAY = _Raw("]")
_CLOSE_OBJECT = _Raw("}")


def _compact_json(value: object) -> str:
    """A parsed array or object as compact JSON text, each number as its token.

    orjson writes it, each number a Fragment of its token (the same text, a tenth of the
    CPU: bench/notes.md); the work list below where orjson refuses: a lone surrogate,
    nesting deeper than its limit."""
    try:
        return orjson.dumps(value, default=_token, option=orjson.OPT_PASSTHROUGH_SUBCLASS).decode()
    except orjson.JSONEncodeError:
        return _compact_json_slowly(value)


def _token(value: object) -> orjson.Fragment:
    if isinstance(value, _Raw):
        return orjson.Fragment(str(value))  # an exact str: Fragment takes no subclass
    raise TypeError(f"not a parsed JSON value: {value!r}")


def _compact_json_slowly(value: object) -> str:
    """A parsed array or object as compact JSON text; a work list, not recursion."""
    parts: list[str] = []
    todo: list[object] = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, _Raw):
            parts.append(item)
        elif isinstance(item, str):
            parts.append(_json_string(item))
        elif item is None:
            parts.append("null")
        elif isinstance(item, bool):
            parts.append("true" if item else "false")
        elif isinstance(item, list):
            parts.append("[")
            todo.append(_CLOSE_ARRAY)
            for index, element in enumerate(reversed(item)):
                todo.extend((_COMMA, element) if index else (element,))
        elif isinstance(item, dict):
            parts.append("{")
            todo.append(_CLOSE_OBJECT)
            for index, (key, element) in enumerate(reversed(item.items())):
                member = (element, _Raw(_json_string(key) + ":"))
                todo.extend((_COMMA, *member) if index else member)
        else:
            raise TypeError(f"not a parsed JSON value: {item!r}")
    return "".join(parts)


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub("\ufffd", text).encode("utf-8")
