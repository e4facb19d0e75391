"""Outage: a failure that repeats is logged when it starts and when it is over. Sampled:
an event that repeats is logged at most once per interval, with how many were not."""

from __future__ import annotations

import logging

import pytest

from workflows.application.outages import Outage, Sampled

log = logging.getLogger("tests.outages")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == log.name]


def test_a_failure_repeated_is_logged_once_and_its_end_with_how_many_and_how_long(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    clock = Clock()
    outage = Outage(log, "the flush failed: %s", "the flush works again", clock=clock)
    for _ in range(5):
        outage.failed(OSError(28, "No space left on device"))
        clock.now += 1.0
    assert outage.ongoing
    outage.passed()
    outage.passed()  # nothing was failing any more: nothing to say
    assert not outage.ongoing
    assert lines(caplog) == [
        ("WARNING", "the flush failed: [Errno 28] No space left on device"),
        ("INFO", "the flush works again, after 5 failures in 5.0 s (4 not logged)"),
    ]


def test_a_failure_for_another_reason_is_logged_as_it_starts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    clock = Clock()
    outage = Outage(log, "failed: %s", "works again", clock=clock)
    outage.failed("disk full")
    outage.failed("disk full")
    clock.now += 0.5
    outage.failed("read-only filesystem")
    outage.passed()
    outage.failed("disk full")  # a new outage
    outage.passed()
    assert lines(caplog) == [
        ("WARNING", "failed: disk full"),
        ("WARNING", "failed: read-only filesystem"),
        ("INFO", "works again, after 3 failures in 0.5 s (1 not logged)"),
        ("WARNING", "failed: disk full"),
        ("INFO", "works again, after 1 failure in 0.0 s (0 not logged)"),
    ]


def test_an_event_repeated_is_logged_once_per_interval_with_how_many_were_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    clock = Clock()
    sampled = Sampled(log, every=10.0, clock=clock)
    for _ in range(100):  # 100 in 9.9 s: the first is logged
        sampled.happened("database", "answering 503: %s", "no connection")
        clock.now += 0.099
    sampled.happened("queue", "answering 503: %s", "blocked")  # another key: at once
    clock.now += 0.2  # 10.1 s after the first line
    sampled.happened("database", "answering 503: %s", "no connection")
    sampled.happened("database", "answering 503: %s", "no connection")
    clock.now += 60.0
    sampled.happened("database", "answering 503: %s", "down")
    assert lines(caplog) == [
        ("WARNING", "answering 503: no connection"),
        ("WARNING", "answering 503: blocked"),
        (
            "WARNING",
            "answering 503: no connection (and 99 more like it since the last such line,"
            " not logged)",
        ),
        (
            "WARNING",
            "answering 503: down (and 1 more like it since the last such line, not logged)",
        ),
    ]
