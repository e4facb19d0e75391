"""Long-poll consume: waiters wake when work arrives, and cost nothing until then."""

from __future__ import annotations

import asyncio
import functools
import os
import re
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.datastructures import QueryParams

from workflows.adapters.csv_export import CsvExporter
from workflows.adapters.memory import InMemoryQueue, InMemoryWorkflowRepository
from workflows.application.doorbell import Doorbell
from workflows.application.ports import ClaimHandler
from workflows.application.use_cases import ConsumeWorkflow
from workflows.domain.ids import uuid7
from workflows.domain.model import JsonDocument, Workflow
from workflows.entrypoints import inputs
from workflows.entrypoints.container import Container, utc_now
from workflows.entrypoints.problems import Problem


@pytest.fixture
def no_recheck(container: Container) -> None:
    """Waiters look again only when the doorbell rings: a missed ring would show."""
    container.consume_workflow().recheck_every = 3600.0


async def test_waiting_consumer_gets_a_workflow_posted_while_it_waits(
    client: httpx.AsyncClient, no_recheck: None
) -> None:
    waiting = asyncio.create_task(client.get("/workflow/consume?wait=10"))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    uuid = (await client.post("/workflow", json={"data": {"a": 1}})).json()["uuid"]
    response = await asyncio.wait_for(waiting, 5)
    assert response.status_code == 200
    assert response.headers["x-workflow-uuid"] == uuid


async def test_a_replayed_workflow_wakes_a_waiting_consumer(
    client: httpx.AsyncClient, no_recheck: None
) -> None:
    uuid = (await client.post("/workflow", json={"data": {"a": 1}})).json()["uuid"]
    assert (await client.get("/workflow/consume")).status_code == 200
    waiting = asyncio.create_task(client.get("/workflow/consume?wait=10"))
    await asyncio.sleep(0.2)
    await client.patch(f"/workflow/{uuid}", json={"status": "inserted"})
    response = await asyncio.wait_for(waiting, 5)
    assert response.headers["x-workflow-uuid"] == uuid


async def test_wait_ends_with_204_when_nothing_arrives(client: httpx.AsyncClient) -> None:
    response = await client.get("/workflow/consume?wait=0.3")
    assert response.status_code == 204


async def test_one_workflow_goes_to_exactly_one_of_many_waiters(
    client: httpx.AsyncClient, no_recheck: None
) -> None:
    waiters = [asyncio.create_task(client.get("/workflow/consume?wait=1.5")) for _ in range(20)]
    await asyncio.sleep(0.2)
    await client.post("/workflow", json={"data": {"a": 1}})
    responses = await asyncio.gather(*waiters)
    assert sorted(r.status_code for r in responses) == [200] + [204] * 19


@pytest.mark.parametrize(
    "wait",
    ["-1", "21", "abc", "1e3", "nan", "inf", "5&wait=6", "20.000000000000001", "20.00000000001"],
)
async def test_bad_wait_is_422(client: httpx.AsyncClient, wait: str) -> None:
    response = await client.get(f"/workflow/consume?wait={wait}")
    assert response.status_code == 422
    assert response.json()["errors"][0]["pointer"] == "/query/wait"


@functools.cache
def wait_pattern() -> re.Pattern[str]:
    document = yaml.safe_load(Path("openapi.yaml").read_text())
    (wait,) = (p for p in document["paths"]["/workflow/consume"]["get"]["parameters"])
    return re.compile(wait["schema"]["pattern"])


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.text("0123456789.", max_size=25),
        st.decimals(min_value=0, max_value=21, allow_nan=False).map(str),
        st.floats(min_value=0, max_value=21).map(repr),
        st.sampled_from(
            [
                "20",
                "20.",
                "20.000",
                "0020.0",
                ".5",
                "5.",
                "19.99999999999999999",
                "20.000000000000001",
            ]
        ),
    )
)
def test_a_wait_is_read_exactly_when_openapi_yaml_allows_it(wait: str) -> None:
    try:
        seconds = inputs.consume_wait(QueryParams({"wait": wait}))
    except Problem:
        assert not wait_pattern().fullmatch(wait), wait
    else:
        assert wait_pattern().fullmatch(wait), wait
        assert seconds == float(wait)


class CountingQueue(InMemoryQueue):
    def __init__(self) -> None:
        self.repository = InMemoryWorkflowRepository()
        super().__init__(self.repository)
        self.attempts = 0

    async def consume(self, handle: ClaimHandler, now: datetime) -> Workflow | None:
        self.attempts += 1
        return await super().consume(handle, now)


async def test_idle_waiters_do_not_poll_the_queue(tmp_path: object) -> None:
    queue, doorbell = CountingQueue(), Doorbell()
    consume = ConsumeWorkflow(queue, CsvExporter(str(tmp_path)), utc_now, doorbell)
    results = await asyncio.gather(*(consume(wait=0.5) for _ in range(50)))
    assert results == [None] * 50
    assert queue.attempts == 50  # one look each, then silence until the wait ran out


async def test_closing_the_doorbell_answers_every_waiter_now(tmp_path: object) -> None:
    queue, doorbell = CountingQueue(), Doorbell()
    consume = ConsumeWorkflow(queue, CsvExporter(str(tmp_path)), utc_now, doorbell)
    waiters = asyncio.gather(*(consume(wait=20) for _ in range(10)))
    await asyncio.sleep(0.1)
    doorbell.close()
    assert await asyncio.wait_for(waiters, 2) == [None] * 10


async def test_a_client_that_has_gone_takes_nothing(tmp_path: object) -> None:
    queue, doorbell = CountingQueue(), Doorbell()
    repository = queue.repository
    workflow = Workflow.new(uuid7(), JsonDocument('{"a": 1}'), (), utc_now())
    await repository.add(workflow)
    await queue.enqueued(workflow)
    consume = ConsumeWorkflow(queue, CsvExporter(str(tmp_path)), utc_now, doorbell)

    async def gone() -> bool:
        return False

    assert await consume(wait=0, still_wanted=gone) is None
    assert queue.attempts == 0
    stored = await repository.get(workflow.uuid)
    assert stored is not None
    assert stored.queued


async def test_a_client_gone_while_its_workflow_was_claimed_leaves_it_queued(
    tmp_path: Path,
) -> None:
    """Asked again once the CSV is made: the row goes back, no file is written, no failure
    is counted, and a waiter is woken for it."""
    queue, doorbell = CountingQueue(), Doorbell()
    repository = queue.repository
    consume = ConsumeWorkflow(queue, CsvExporter(str(tmp_path)), utc_now, doorbell, repository)
    consume.recheck_every = 3600.0
    asked: list[bool] = []

    async def leaves_after_the_claim() -> bool:
        asked.append(not asked)  # there when the consume starts, gone at the second ask
        return asked[-1]

    waiter = asyncio.create_task(consume(wait=20))  # finds nothing, waits for a ring
    await asyncio.sleep(0.05)
    workflow = Workflow.new(uuid7(), JsonDocument('{"a": 1}'), (), utc_now())
    await repository.add(workflow)
    await queue.enqueued(workflow)  # (no ring: the waiter wakes only for the put-back)
    assert await consume(wait=0, still_wanted=leaves_after_the_claim) is None
    assert asked == [True, False]
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".csv")]
    stored = await repository.get(workflow.uuid)
    assert stored is not None
    assert stored.queued
    assert stored.delivery_attempts == 0
    taken = await asyncio.wait_for(waiter, 1)  # rung for it
    assert taken is not None
    assert taken.workflow.uuid == workflow.uuid


async def test_a_workflow_wakes_one_waiter_not_all(tmp_path: object) -> None:
    queue, doorbell = CountingQueue(), Doorbell()
    consume = ConsumeWorkflow(queue, CsvExporter(str(tmp_path)), utc_now, doorbell)
    consume.recheck_every = 3600.0
    waiters = [asyncio.create_task(consume(wait=20)) for _ in range(20)]
    await asyncio.sleep(0.1)
    assert queue.attempts == 20
    workflow = Workflow.new(uuid7(), JsonDocument('{"a": 1}'), (), utc_now())
    await queue.repository.add(workflow)
    await queue.enqueued(workflow)
    doorbell.ring()
    done, _ = await asyncio.wait(waiters, timeout=2, return_when=asyncio.FIRST_COMPLETED)
    results = [task.result() for task in done]
    assert [result.workflow.uuid if result else None for result in results] == [workflow.uuid]
    assert waiters[0] in done  # the one that waited longest
    await asyncio.sleep(0.1)
    assert queue.attempts == 21  # the woken one looked; the 19 others did not
    doorbell.close()
    assert await asyncio.gather(*waiters[1:]) == [None] * 19


async def test_a_woken_waiter_whose_client_has_gone_wakes_another(tmp_path: object) -> None:
    queue, doorbell = CountingQueue(), Doorbell()
    consume = ConsumeWorkflow(queue, CsvExporter(str(tmp_path)), utc_now, doorbell)
    consume.recheck_every = 3600.0
    there = [True]

    async def first_client() -> bool:
        return there[0]

    gone_later = asyncio.create_task(consume(wait=20, still_wanted=first_client))
    await asyncio.sleep(0.05)
    other = asyncio.create_task(consume(wait=20))
    await asyncio.sleep(0.05)
    there[0] = False  # the longest waiting one's client goes away
    workflow = Workflow.new(uuid7(), JsonDocument('{"a": 1}'), (), utc_now())
    await queue.repository.add(workflow)
    await queue.enqueued(workflow)
    doorbell.ring()
    assert await asyncio.wait_for(gone_later, 1) is None
    consumed = await asyncio.wait_for(other, 1)  # the turn was passed on
    assert consumed is not None
    assert consumed.workflow.uuid == workflow.uuid


class FailingOnce(CsvExporter):
    """An export that fails the first time it is asked for, then works."""

    def __init__(self, export_dir: str) -> None:
        super().__init__(export_dir)
        self.failures = 0

    async def render(self, workflow: Workflow) -> bytes:
        if self.failures == 0:
            self.failures += 1
            raise RuntimeError("the disk said no, once")
        return await super().render(workflow)


async def test_a_workflow_whose_export_failed_wakes_a_waiter(tmp_path: object) -> None:
    queue, doorbell = CountingQueue(), Doorbell()
    consume = ConsumeWorkflow(
        queue, FailingOnce(str(tmp_path)), utc_now, doorbell, queue.repository
    )
    consume.recheck_every = 3600.0
    waiting = asyncio.create_task(consume(wait=20))
    await asyncio.sleep(0.05)
    workflow = Workflow.new(uuid7(), JsonDocument('{"a": 1}'), (), utc_now())
    await queue.repository.add(workflow)
    await queue.enqueued(workflow)  # no ring: the waiter sleeps on
    with pytest.raises(RuntimeError):
        await consume(wait=0)  # takes it, fails, puts it back
    consumed = await asyncio.wait_for(waiting, 1)  # woken: it is queued again
    assert consumed is not None
    assert consumed.workflow.uuid == workflow.uuid
    assert consumed.workflow.delivery_attempts == 1
