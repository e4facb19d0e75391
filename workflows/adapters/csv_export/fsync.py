"""fsync a file without blocking the event loop.

The fsyncs go through the kernel's asynchronous I/O (`IOCB_CMD_FSYNC`, with caio): the
kernel's own workers run the same fsync and wake the event loop when it is done, so no
Python thread takes the GIL for it (bench/notes.md has what that saved). Where that is not
available (another OS, no AIO context to spare, a filesystem that refuses), the fsync runs
in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable
from typing import Protocol

log = logging.getLogger(__name__)


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
