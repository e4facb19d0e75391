"""How late a worker's event loop runs, and what holds it when it stops.

Every request a worker serves runs on its one event loop: a call that blocks the loop (a
file write on a filesystem that hangs, an NFS server gone or a frozen disk; a long C call
that keeps the GIL) holds every request of the process, /healthz included, and nothing in
the loop can say so. Here a heartbeat on the loop records how late it runs
(`workflows_event_loop_lag_seconds`), and a thread of its own looks at the heartbeat: once
it is `threshold` s late, the thread logs a WARNING with what the loop's thread is doing
(its innermost frames) and counts `workflows_event_loop_stalls_total`; when the loop runs
again, the heartbeat logs how long it was held.

The heartbeat costs the loop one timer callback every HEARTBEAT s, the thread a wake-up
every `threshold` / 4 s (at most HEARTBEAT).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import PurePath

from prometheus_client import Counter, Histogram

log = logging.getLogger(__name__)

HEARTBEAT = 0.25
"""Seconds between the heartbeat's runs on the loop."""
FRAMES = 8
"""Innermost frames of the loop's thread named in a stall's WARNING."""

LAG = Histogram(
    "workflows_event_loop_lag_seconds",
    "How late the event loop ran a callback due every 0.25 s (one sample each time).",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
STALLS = Counter(
    "workflows_event_loop_stalls_total",
    "Times the event loop ran nothing for LOOP_STALL_SECONDS or more.",
)


class LoopWatch:
    """Watch `loop` (run by the calling thread) from `start` until `stop`: both are called
    on the loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        threshold: float,
        *,
        heartbeat: float = HEARTBEAT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold <= 0:
            raise ValueError("a stall threshold must be positive")
        self._loop = loop
        self._threshold = threshold
        self._heartbeat = heartbeat
        self._clock = clock
        self._loop_thread = threading.get_ident()
        self._lock = threading.Lock()
        self._due = 0.0  # when the heartbeat should run next
        self._reported: float | None = None  # the `_due` of a stall the thread logged
        self._timer: asyncio.TimerHandle | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._schedule()
        self._thread = threading.Thread(target=self._watch, name="loop-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._timer is not None:
            self._timer.cancel()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _schedule(self) -> None:
        with self._lock:
            self._due = self._clock() + self._heartbeat
        self._timer = self._loop.call_later(self._heartbeat, self._beat)

    def _beat(self) -> None:
        now = self._clock()
        with self._lock:
            late = max(0.0, now - self._due)
            reported, self._reported = self._reported, None
        LAG.observe(late)
        if reported is not None:
            log.warning("the event loop runs again: it ran nothing for %.1f s", now - reported)
        if not self._stopping.is_set():
            self._schedule()

    def _watch(self) -> None:
        every = min(self._threshold / 4, self._heartbeat)
        while not self._stopping.wait(every):
            with self._lock:
                due = self._due
                if self._reported == due or self._clock() - due < self._threshold:
                    continue
                self._reported = due
            STALLS.inc()
            log.warning(
                "the event loop has run nothing for %.1f s (LOOP_STALL_SECONDS=%g), every"
                " request of this process waits; its thread is in: %s",
                self._clock() - due,
                self._threshold,
                self._where(),
            )

    def _where(self) -> str:
        """The loop thread's innermost frames, innermost first: `package/file.py:line
        function` (the file's last two path parts)."""
        frame = sys._current_frames().get(self._loop_thread)
        if frame is None:
            return "(its thread has ended)"
        frames = traceback.extract_stack(frame)[-FRAMES:]
        return " < ".join(
            f"{'/'.join(PurePath(f.filename).parts[-2:])}:{f.lineno} {f.name}"
            for f in reversed(frames)
        )


@contextlib.contextmanager
def watching(threshold: float) -> Iterator[None]:
    """A `LoopWatch` on the running loop while the block runs; none if `threshold` is 0."""
    if threshold <= 0:
        yield
        return
    watch = LoopWatch(asyncio.get_running_loop(), threshold)
    watch.start()
    try:
        yield
    finally:
        watch.stop()
