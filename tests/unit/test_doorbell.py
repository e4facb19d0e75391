"""The doorbell wakes as many waiters as workflows rang for, the longest waiting first."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from workflows.application.doorbell import Doorbell


async def waiting(doorbell: Doorbell, count: int, within: float = 5.0) -> list[asyncio.Task[bool]]:
    """`count` waiters, each waiting (in the order made) when this returns."""
    waiters = []
    for _ in range(count):
        waiters.append(asyncio.create_task(doorbell.wait(doorbell.ticket(), within)))
        await asyncio.sleep(0)
    return waiters


async def test_a_ring_wakes_as_many_waiters_as_it_rang_for_longest_waiting_first() -> None:
    doorbell = Doorbell()
    waiters = await waiting(doorbell, 5)
    doorbell.ring(2)
    await asyncio.sleep(0.01)
    assert [w.done() for w in waiters] == [True, True, False, False, False]
    doorbell.ring()
    await asyncio.sleep(0.01)
    assert [w.done() for w in waiters] == [True, True, True, False, False]
    doorbell.close()
    assert await asyncio.gather(*waiters) == [True] * 5


async def test_a_ring_between_ticket_and_wait_is_not_missed() -> None:
    doorbell = Doorbell()
    busy = await waiting(doorbell, 2)
    ticket = doorbell.ticket()  # taken, then the caller looks for work
    doorbell.ring()  # wakes the first waiter; this caller is not waiting yet
    assert await asyncio.wait_for(doorbell.wait(ticket, 5.0), 1.0) is True
    await asyncio.sleep(0.01)
    assert [w.done() for w in busy] == [True, False]
    doorbell.close()
    await asyncio.gather(*busy)


async def test_a_waiter_that_timed_out_takes_no_ring_away() -> None:
    doorbell = Doorbell()
    (gone,) = await waiting(doorbell, 1, within=0.01)
    assert await gone is False
    (second,) = await waiting(doorbell, 1)
    doorbell.ring()
    assert await asyncio.wait_for(second, 1.0) is True


async def test_a_waiter_woken_then_cancelled_passes_its_turn_on() -> None:
    doorbell = Doorbell()
    first, second = await waiting(doorbell, 2)
    doorbell.ring()
    first.cancel()  # woken, cancelled before it ran
    assert await asyncio.wait_for(second, 1.0) is True
    assert first.cancelled()


async def test_pass_on_wakes_the_next_waiter() -> None:
    doorbell = Doorbell()
    first, second = await waiting(doorbell, 2)
    doorbell.pass_on()
    await asyncio.sleep(0.01)
    assert (first.done(), second.done()) == (True, False)
    doorbell.close()
    await second


async def test_closing_wakes_every_waiter_and_every_later_wait_returns_at_once() -> None:
    doorbell = Doorbell()
    waiters = await waiting(doorbell, 10)
    doorbell.close()
    assert await asyncio.wait_for(asyncio.gather(*waiters), 1.0) == [True] * 10
    assert await asyncio.wait_for(doorbell.wait(doorbell.ticket(), 5.0), 1.0) is True


async def test_a_listener_that_cannot_connect_warns_once_until_it_listens_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """While the database was away it warned at every retry (every 0.5-5 s); now once, when
    it starts failing for a reason (and again only for another reason)."""
    from workflows.adapters.postgres import doorbell as doorbell_module
    from workflows.adapters.postgres.database import BoundedConnection

    attempts: list[float] = []
    third = asyncio.Event()
    connect = BoundedConnection.connect

    async def counted(*args: Any, **kwargs: Any) -> Any:
        attempts.append(asyncio.get_running_loop().time())
        if len(attempts) == 3:
            third.set()
        return await connect(*args, **kwargs)

    monkeypatch.setattr(BoundedConnection, "connect", counted)
    caplog.set_level(logging.INFO)
    bell = doorbell_module.PostgresDoorbell("postgresql://postgres@127.0.0.1:1/x", pool=None)  # type: ignore[arg-type]
    await bell.start()
    try:
        await asyncio.wait_for(third.wait(), 10)
        await asyncio.sleep(0.1)  # the third attempt has failed
    finally:
        await bell.stop()
    lost = [r for r in caplog.records if "doorbell listener lost its connection" in r.message]
    assert len(lost) == 1, [r.message for r in lost]
    assert lost[0].levelno == logging.WARNING
