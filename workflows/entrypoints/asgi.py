"""The ASGI app as uvicorn runs it: `uvicorn --factory workflows.entrypoints.asgi:create`
(`workflows serve` does; other ASGI servers can run the same factory, README)."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

from starlette.applications import Starlette

from workflows.entrypoints.config import Settings
from workflows.entrypoints.container import Container, running
from workflows.entrypoints.http import create_app
from workflows.entrypoints.logs import configure_logging, mask_values
from workflows.entrypoints.loop_watch import watching
from workflows.entrypoints.observability import sampling

THREAD_SWITCH_INTERVAL = 0.0005
"""Seconds a thread that wants the GIL waits before the running one must let go (Python's
default is 0.005). The event loop hands blocking work to threads (CSV fsync, pika), and each
of their system calls needs the GIL back: behind a busy loop, 5 ms per call piles up into
consumes of 100 ms and more; 0.5 ms keeps them near the disk's own latency (docs/benchmarks.md)."""


def create(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()
    sys.setswitchinterval(THREAD_SWITCH_INTERVAL)
    # `workflows serve --access-log` sets WORKFLOWS_ACCESS_LOG for its workers.
    access_log = os.environ.get("WORKFLOWS_ACCESS_LOG") == "1"
    configure_logging(settings.log_level, settings.log_format, access_log)
    mask_values(settings.api_tokens)
    container = Container(settings=settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # The loop is watched from the start: a start-up that blocks it is logged too.
        with watching(settings.loop_stall_seconds):
            async with running(container), sampling(container):
                _on_stop_signal(container.doorbell().close)
                # Everything made at start-up (modules, the app, pools) lives as long as the
                # process: out of the collector's sight, a full collection only walks what
                # requests made, and stops costing a long pause now and then.
                gc.collect()
                gc.freeze()
                yield

    return create_app(container, lifespan)


def _on_stop_signal(callback: Callable[[], None]) -> None:
    """Run `callback` on SIGTERM/SIGINT, then uvicorn's own handler: long-polling consumers
    answer at once instead of holding the graceful shutdown for up to their whole wait."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)

        def handler(number: int, frame: FrameType | None, previous: Any = previous) -> None:
            loop.call_soon_threadsafe(callback)
            servers = getattr(getattr(previous, "__self__", None), "servers", None)
            if servers:  # uvicorn's Server.handle_exit
                loop.call_soon_threadsafe(_stop_accepting, loop, servers, previous, number)
            elif callable(previous):
                previous(number, frame)

        signal.signal(signum, handler)


ACCEPTED_GRACE = 0.5
"""Seconds between refusing new connections and starting uvicorn's graceful shutdown."""


def _stop_accepting(
    loop: asyncio.AbstractEventLoop, servers: list[asyncio.Server], stop: Any, number: int
) -> None:
    """Stop accepting now (other workers take new connections on the shared socket), and
    let uvicorn begin its shutdown ACCEPTED_GRACE s later. Its shutdown closes at once
    every connection whose request it has not read yet; one accepted just before the
    signal has its request on the way, and would be closed unanswered."""
    for server in servers:
        server.close()
    loop.call_later(ACCEPTED_GRACE, stop, number, None)
