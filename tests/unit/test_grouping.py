"""Group: how calls gather into batches."""

from __future__ import annotations

import asyncio

import pytest

from workflows.adapters.grouping import Group, settle


class Batches(Group[int, int]):
    """Records each batch; answers each call with its own item."""

    def __init__(self, *, linger: int) -> None:
        super().__init__(max_batch=32, parallel=1, linger=linger)
        self.batches: list[list[int]] = []

    async def run(self, batch: list[tuple[int, asyncio.Future[int]]]) -> None:
        self.batches.append([item for item, _ in batch])
        for item, future in batch:
            settle(future, item)


async def a_call_then_one_a_loop_pass_later(group: Batches) -> list[int]:
    """As two requests read in consecutive passes of the event loop."""

    async def next_pass() -> int:
        await asyncio.sleep(0)
        return await group.call(2)

    return list(await asyncio.gather(group.call(1), next_pass()))


@pytest.mark.parametrize(("linger", "batches"), [(0, [[1], [2]]), (1, [[1, 2]])])
async def test_a_call_made_in_the_pass_a_batch_lingers_for_joins_it(
    linger: int, batches: list[list[int]]
) -> None:
    group = Batches(linger=linger)
    assert await a_call_then_one_a_loop_pass_later(group) == [1, 2]
    assert group.batches == batches


async def test_a_lone_call_still_goes_without_company() -> None:
    group = Batches(linger=1)
    assert await asyncio.wait_for(group.call(7), 1) == 7
    assert group.batches == [[7]]
