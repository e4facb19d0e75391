"""The event loop's watch: its lag histogram, and a stall logged with what holds the loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from workflows.entrypoints import loop_watch
from workflows.entrypoints.loop_watch import LoopWatch, watching

THRESHOLD = 0.2


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def hold_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # what a write to a filesystem that hangs does to the loop


@contextlib.contextmanager
def watched(threshold: float, heartbeat: float = 0.05) -> Iterator[LoopWatch]:
    watch = LoopWatch(asyncio.get_running_loop(), threshold, heartbeat=heartbeat)
    watch.start()
    try:
        yield watch
    finally:
        watch.stop()


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == loop_watch.__name__]


async def test_a_stall_is_logged_once_with_what_holds_the_loop_and_again_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=loop_watch.__name__)
    stalls = sample("workflows_event_loop_stalls_total")
    with watched(THRESHOLD):
        await asyncio.sleep(0.2)
        hold_the_loop(1.0)  # five thresholds: still one stall
        await asyncio.sleep(0.2)
    logged = messages(caplog)
    assert len(logged) == 2, logged
    held, again = logged
    assert "the event loop has run nothing for 0.2 s (LOOP_STALL_SECONDS=0.2)" in held
    # Innermost first: the sleep's caller, then this test.
    assert re.search(r"in: unit/test_loop_watch\.py:\d+ hold_the_loop < unit/test_loop_watch", held)
    ended = re.fullmatch(r"the event loop runs again: it ran nothing for (.*) s", again)
    assert ended is not None, again
    assert 0.9 <= float(ended[1]) <= 1.5
    assert sample("workflows_event_loop_stalls_total") == stalls + 1


async def test_a_busy_loop_that_never_stops_for_the_threshold_logs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=loop_watch.__name__)
    stalls = sample("workflows_event_loop_stalls_total")
    with watched(THRESHOLD):
        for _ in range(40):  # 1.2 s of 30 ms holds
            hold_the_loop(0.03)
            await asyncio.sleep(0)
    assert messages(caplog) == []
    assert sample("workflows_event_loop_stalls_total") == stalls


async def test_the_lag_histogram_counts_each_heartbeat_and_how_late_it_ran() -> None:
    count = sample("workflows_event_loop_lag_seconds_count")
    total = sample("workflows_event_loop_lag_seconds_sum")
    with watched(10.0):
        await asyncio.sleep(0.3)
        hold_the_loop(0.3)
        await asyncio.sleep(0.1)
    beats = sample("workflows_event_loop_lag_seconds_count") - count
    assert 5 <= beats <= 11
    # The beat due during the hold ran up to 0.3 s late; the others a few ms each.
    assert 0.2 <= sample("workflows_event_loop_lag_seconds_sum") - total <= 0.3 + beats * 0.05


async def test_stop_ends_the_thread_and_the_heartbeat() -> None:
    count = sample("workflows_event_loop_lag_seconds_count")
    watch = LoopWatch(asyncio.get_running_loop(), THRESHOLD, heartbeat=0.02)
    watch.start()
    await asyncio.sleep(0.1)
    watch.stop()
    stopped_at = sample("workflows_event_loop_lag_seconds_count")
    assert stopped_at > count
    await asyncio.sleep(0.1)
    assert sample("workflows_event_loop_lag_seconds_count") == stopped_at
    assert not any(t.name == "loop-watch" and t.is_alive() for t in _threads())


async def test_watching_with_a_threshold_of_zero_watches_nothing() -> None:
    count = sample("workflows_event_loop_lag_seconds_count")
    with watching(0):
        assert not any(t.name == "loop-watch" for t in _threads())
        await asyncio.sleep(0.3)
    assert sample("workflows_event_loop_lag_seconds_count") == count
    with watching(THRESHOLD):
        assert any(t.name == "loop-watch" and t.is_alive() for t in _threads())
    assert not any(t.name == "loop-watch" and t.is_alive() for t in _threads())


async def test_a_threshold_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        LoopWatch(asyncio.get_running_loop(), 0)


def _threads() -> list[threading.Thread]:
    return threading.enumerate()
