"""CPU-bound work goes to one thread per process, one piece at a time (adapters/offload.py):
a large CSV render and a large POST's parse queue behind each other instead of each taking
a share of the GIL from the event loop."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import uuid
from datetime import UTC, datetime

import orjson
import pytest
from starlette.requests import ClientDisconnect

from workflows.adapters import offload as offload_module
from workflows.adapters.csv_export import CsvExporter
from workflows.adapters.csv_export import exporter as exporter_module
from workflows.adapters.csv_export.render import render_csv
from workflows.adapters.offload import offload
from workflows.domain.model import JsonDocument, Workflow, WorkflowStatus
from workflows.entrypoints import schemas

WAIT = 10.0


class Held:
    """A function that records that it started and returns only once released."""

    def __init__(self, result: object = None) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.result = result
        self.thread: str | None = None

    def __call__(self, *_: object) -> object:
        self.thread = threading.current_thread().name
        self.started.set()
        assert self.release.wait(WAIT), "never released"
        return self.result


async def test_work_runs_in_one_thread_one_piece_after_the_other() -> None:
    first, second = Held("first"), Held("second")
    running_first = asyncio.create_task(offload(first))
    assert await asyncio.to_thread(first.started.wait, WAIT)
    running_second = asyncio.create_task(offload(second))
    # The loop goes on (this coroutine runs), and the second waits for the first's end.
    assert not await asyncio.to_thread(second.started.wait, 0.3)
    first.release.set()
    assert await running_first == "first"
    assert await asyncio.to_thread(second.started.wait, WAIT)
    second.release.set()
    assert await running_second == "second"
    assert first.thread == second.thread
    assert first.thread is not None
    assert first.thread.startswith("cpu-work")
    assert first.thread != threading.current_thread().name


async def test_a_large_post_waits_for_a_large_render_before_its_parse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both kinds of work share the thread: a POST body parsed while a CSV renders would
    make two threads taking turns with the event loop."""
    rows = ",".join(f'{{"n":{n},"text":"row {n}"}}' for n in range(1000))
    text = f"[{rows}]"
    assert len(text) > exporter_module.RENDER_ON_LOOP_MAX
    render = Held(b"csv")
    monkeypatch.setattr(exporter_module, "render_csv", render)
    now = datetime.now(UTC)
    item = Workflow(uuid.uuid4(), WorkflowStatus.INSERTED, JsonDocument(text), ("a",), now, now)
    rendering = asyncio.create_task(CsvExporter("unused").render(item))
    assert await asyncio.to_thread(render.started.wait, WAIT)

    body = orjson.dumps({"data": {"text": "x" * schemas.PARSE_ON_LOOP_MAX}, "steps": ["a"]})
    parse = schemas.parse_new_workflow
    parsing_started = threading.Event()

    def recorded_parse(raw: bytes) -> object:
        parsing_started.set()
        return parse(raw)

    monkeypatch.setattr(schemas, "parse_new_workflow", recorded_parse)
    reading = asyncio.create_task(schemas.read_new_workflow(body))
    assert not await asyncio.to_thread(parsing_started.wait, 0.3)
    render.release.set()
    assert await rendering == b"csv"
    assert await reading == parse(body)
    assert parsing_started.is_set()


async def test_work_cancelled_before_its_turn_never_runs() -> None:
    first, never = Held(), Held()
    running = asyncio.create_task(offload(first))
    assert await asyncio.to_thread(first.started.wait, WAIT)
    waiting = asyncio.create_task(offload(never))
    await asyncio.sleep(0)  # it is queued behind the first
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    first.release.set()
    await running
    assert await offload(lambda: "after") == "after"  # the queue has moved past it
    assert not never.started.is_set()


async def test_work_sees_the_callers_context_and_raises_its_errors() -> None:
    variable: contextvars.ContextVar[str] = contextvars.ContextVar("variable")
    variable.set("the caller's")
    assert await offload(variable.get) == "the caller's"

    def fails() -> None:
        raise ValueError("from the thread")

    with pytest.raises(ValueError, match="from the thread"):
        await offload(fails)
    assert await offload(render_csv, '{"a":1}') == render_csv('{"a":1}')


def test_a_forked_child_starts_a_thread_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a fork the parent's thread is not there: the child makes its own."""
    asyncio.run(offload(lambda: None))
    assert offload_module._executor is not None
    offload_module._forget_in_child()  # what os.register_at_fork runs in a child
    assert offload_module._executor is None
    assert asyncio.run(offload(lambda: 2)) == 2


async def test_work_whose_caller_no_longer_wants_it_when_its_turn_comes_never_runs() -> None:
    """uvicorn cancels no request whose client has gone: its body's parse was done all the
    same (an audit's 40 bodies of 800 KB from clients that left held the thread 20 s)."""
    first, unwanted = Held(), Held()
    asked: list[str] = []

    async def gone() -> bool:
        asked.append("gone")
        return False

    async def there() -> bool:
        asked.append("there")
        return True

    running = asyncio.create_task(offload(first))
    assert await asyncio.to_thread(first.started.wait, WAIT)
    skipped = asyncio.create_task(offload(unwanted, wanted=gone))
    kept = asyncio.create_task(offload(lambda: "kept", wanted=there))
    await asyncio.sleep(0.05)
    assert asked == [], "asked when its turn comes, not when it is queued"
    first.release.set()
    await running
    with pytest.raises(offload_module.Unwanted):
        await skipped
    assert await kept == "kept"
    assert asked == ["gone", "there"]
    assert not unwanted.started.is_set()


async def test_a_large_body_whose_client_has_gone_is_not_parsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parsed: list[bytes] = []
    monkeypatch.setattr(schemas, "parse_new_workflow", parsed.append)
    body = orjson.dumps({"data": {"k": "v" * schemas.PARSE_ON_LOOP_MAX}})

    async def gone() -> bool:
        return False

    with pytest.raises(ClientDisconnect):
        await schemas.read_new_workflow(body, gone)
    assert parsed == []
