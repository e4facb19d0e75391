"""A failure that repeats, logged when it starts and when it is over, not each time."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable


class Outage:
    """One kind of failure of one thing (every flush of a full disk, say), logged at
    WARNING when it starts, or fails for another reason, and at INFO when it is over,
    with how many times it failed and for how long. In between each failure for the
    same reason is only counted: what /readyz does for its checks.

    `failing` is the WARNING's message, with a `%s` for the reason; `over` the INFO's."""

    def __init__(
        self,
        log: logging.Logger,
        failing: str,
        over: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._failing = failing
        self._over = over
        self._clock = clock
        self._reason: str | None = None
        self._since = 0.0
        self._failures = 0
        self._logged = 0

    @property
    def ongoing(self) -> bool:
        return self._reason is not None

    def failed(self, reason: object) -> None:
        text = str(reason)
        self._failures += 1
        if text == self._reason:
            return
        if self._reason is None:
            self._since = self._clock()
        self._reason = text
        self._logged += 1
        self._log.warning(self._failing, text)

    def passed(self) -> None:
        if self._reason is None:
            return
        failures, logged = self._failures, self._logged
        lasted = self._clock() - self._since
        self._reason, self._failures, self._logged = None, 0, 0
        self._log.info(
            "%s, after %d failure%s in %.1f s (%d not logged)",
            self._over,
            failures,
            "" if failures == 1 else "s",
            lasted,
            failures - logged,
        )


class Sampled:
    """An event that may come once per request for as long as a failure lasts (a 503
    while the database is away, say): logged at `level` the first time for its `key`,
    then at most once per `every` seconds, each line with how many like it since the
    last one were not logged. Metrics count every one."""

    def __init__(
        self,
        log: logging.Logger,
        *,
        level: int = logging.WARNING,
        every: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._level = level
        self._every = every
        self._clock = clock
        self._last: dict[str, tuple[float, int]] = {}  # key: when logged, how many since

    def happened(self, key: str, message: str, *args: object) -> None:
        now = self._clock()
        logged_at, unlogged = self._last.get(key, (-math.inf, 0))
        if now - logged_at < self._every:
            self._last[key] = (logged_at, unlogged + 1)
            return
        self._last[key] = (now, 0)
        if unlogged:
            message += " (and %d more like it since the last such line, not logged)"
            args = (*args, unlogged)
        self._log.log(self._level, message, *args)
