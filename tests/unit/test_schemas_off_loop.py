"""A large POST body is parsed in a thread (schemas.read_new_workflow), a small one on the
event loop."""

from __future__ import annotations

import asyncio
import threading

import orjson
import pytest

from workflows.entrypoints import schemas
from workflows.entrypoints.problems import Problem


def body_of(size: int) -> bytes:
    return orjson.dumps({"data": {"text": "x" * size}, "steps": ["a"]})


async def test_a_large_body_is_parsed_while_the_event_loop_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The parse of a body over PARSE_ON_LOOP_MAX holds up no other request: here it
    cannot finish until this coroutine, on the same loop, lets it."""
    started, release = threading.Event(), threading.Event()
    parse = schemas.parse_new_workflow

    def parse_when_released(body: bytes) -> object:
        started.set()
        release.wait(10)  # on the event loop, this would stop it for 10 s
        return parse(body)

    monkeypatch.setattr(schemas, "parse_new_workflow", parse_when_released)
    body = body_of(schemas.PARSE_ON_LOOP_MAX)
    reading = asyncio.create_task(schemas.read_new_workflow(body))
    assert await asyncio.to_thread(started.wait, 10)
    assert not reading.done()  # the loop ran this coroutine while the parse was under way
    release.set()
    assert await reading == parse(body)


async def test_a_small_body_is_parsed_on_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_thread(*_: object) -> object:
        raise AssertionError("a small body went to a thread")

    monkeypatch.setattr(schemas, "offload", no_thread)
    body = body_of(schemas.PARSE_ON_LOOP_MAX - 100)
    assert len(body) <= schemas.PARSE_ON_LOOP_MAX
    assert await schemas.read_new_workflow(body) == schemas.parse_new_workflow(body)


async def test_a_large_invalid_body_gets_the_same_problem_from_the_thread() -> None:
    body = b'{"data": {"text": "' + b"x" * schemas.PARSE_ON_LOOP_MAX + b'"}, "uuid": "x"}'
    with pytest.raises(Problem) as raised:
        await schemas.read_new_workflow(body)
    with pytest.raises(Problem) as expected:
        schemas.parse_new_workflow(body)
    assert raised.value.status == expected.value.status == 422
    assert raised.value.errors == expected.value.errors


async def test_a_large_patch_body_is_parsed_off_the_event_loop() -> None:
    """README (`MAX_BODY_BYTES`): a body over 16 KiB is parsed in a thread; a PATCH's was
    not (a cost audit: 1 MiB held the event loop 0.24-0.38 s, for a 422)."""
    loop_thread = threading.get_ident()
    parsed_in: list[int] = []
    parse = schemas.parse_status_patch

    def recording(body: bytes) -> object:
        parsed_in.append(threading.get_ident())
        return parse(body)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(schemas, "parse_status_patch", recording)
        small = orjson.dumps({"status": "consumed"})
        assert await schemas.read_status_patch(small) == parse(small)
        large = orjson.dumps({"status": "consumed", "x": "y" * schemas.PARSE_ON_LOOP_MAX})
        with pytest.raises(Problem) as refused:  # an unknown field, found in the thread
            await schemas.read_status_patch(large)
    assert refused.value.status == 422
    assert parsed_in[0] == loop_thread
    assert parsed_in[1] != loop_thread
