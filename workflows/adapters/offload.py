"""CPU-bound work off the event loop, one piece at a time: one thread per process.

A large POST body's parse (`entrypoints/schemas.py`) and a large document's CSV render
(`csv_export/exporter.py`) run here rather than on the event loop, so that one of them
slows the other requests of its process instead of stopping them. They run in ONE thread,
in the order asked, not in a pool: under Python's GIL a second thread of such work adds no
throughput, and each one takes its share of the GIL from the event loop. With a pool
(`asyncio.to_thread`, 6 threads on 2 cores), 8 clients fetching the CSV of an 8 MB export
at once took the loop's GETs from a p50 of ~5 ms to ~55 ms (p99 ~190 ms); through this one
thread, ~9 ms (p99 ~32 ms), and the 8 clients got their CSVs ~15 % faster (bench/notes.md,
session 29).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import threading
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_executor: ThreadPoolExecutor | None = None
_lock = threading.Lock()


class Unwanted(Exception):
    """The caller's `wanted` said no when the work's turn came: it was not done."""


async def offload(
    function: Callable[..., T],
    /,
    *args: object,
    wanted: Callable[[], Awaitable[bool]] | None = None,
) -> T:
    """`function(*args)` in the process's CPU-work thread, after the work asked for before
    it. Like `asyncio.to_thread`, it runs in a copy of the caller's context; a caller
    cancelled before its turn takes its work off the queue. So does one whose `wanted`
    answers False when its turn comes (`Unwanted`): uvicorn cancels no request whose client
    has gone, and an audit's 40 bodies of 800 KB, each sent by a client that left at once,
    held the thread 20 s, and another client's large POST with it."""
    loop = asyncio.get_running_loop()
    call = functools.partial(contextvars.copy_context().run, function, *args)
    async with _turns(loop):  # FIFO, as the executor's queue: one piece of work at a time
        if wanted is not None and not await wanted():
            raise Unwanted
        return await loop.run_in_executor(_the_executor(), call)


_TURNS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def _turns(loop: asyncio.AbstractEventLoop) -> asyncio.Lock:
    turns = _TURNS.get(loop)
    if turns is None:
        turns = _TURNS[loop] = asyncio.Lock()
    return turns


def _the_executor() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        with _lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpu-work")
    return _executor


def _forget_in_child() -> None:
    """A forked child has none of its parent's threads: it starts its own when it needs one."""
    global _executor, _lock
    _executor = None
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)
