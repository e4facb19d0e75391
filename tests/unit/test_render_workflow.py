"""render_workflow(s) (one orjson call, `data` as a Fragment) against the reference it
replaced (the JSON joined from pieces): the same bytes for any workflow, including steps
with every kind of character, timestamps with and without microseconds, and data texts
with exact numbers and escapes that must be copied as they are."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from uuid import uuid4

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from workflows.domain.model import JsonDocument, Workflow, WorkflowStatus
from workflows.entrypoints import rendering


def reference(w: Workflow) -> bytes:
    """The previous render_workflow, kept as the definition of the answer's bytes."""
    return b"".join(
        (
            b'{"uuid":"',
            str(w.uuid).encode(),
            b'","status":"',
            w.status.value.encode(),
            b'","data":',
            w.data.text.encode(),
            b',"steps":',
            orjson.dumps(w.steps),
            b',"created_at":',
            orjson.dumps(w.created_at, option=orjson.OPT_UTC_Z),
            b',"updated_at":',
            orjson.dumps(w.updated_at, option=orjson.OPT_UTC_Z),
            b',"delivery_attempts":',
            str(w.delivery_attempts).encode(),
            b',"dead_lettered_at":',
            orjson.dumps(w.dead_lettered_at, option=orjson.OPT_UTC_Z),
            b"}",
        )
    )


DATA_TEXTS = [
    "{}",
    '{"a":1}',
    '{"n":2.50,"big":1E+400,"neg":-0,"int":123456789012345678901234567890}',
    '{"s":"é ü ✓ 𝄞","esc":"\\u0000\\n\\"\\\\\\/","nested":{"x":[1,{"y":null}]}}',
    '[{"a":true},{"b":false}]',
]
timestamps = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.just(UTC)
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
data_texts = st.sampled_from(DATA_TEXTS) | st.dictionaries(st.text(), json_values).map(
    lambda d: json.dumps(d, ensure_ascii=False, separators=(",", ":"))
)
workflows = st.builds(
    Workflow,
    uuid=st.uuids(),
    status=st.sampled_from(WorkflowStatus),
    data=data_texts.map(JsonDocument),
    steps=st.lists(st.text(), max_size=4).map(tuple),
    created_at=timestamps,
    updated_at=timestamps,
    delivery_attempts=st.integers(min_value=0, max_value=2**31),
    dead_lettered_at=st.none() | timestamps,
)


@settings(max_examples=300)
@given(workflows)
def test_one_workflow_renders_as_the_reference(workflow: Workflow) -> None:
    assert rendering.render_workflow(workflow) == reference(workflow)


@given(st.lists(workflows, max_size=5))
def test_a_page_renders_as_the_reference_joined(page: list[Workflow]) -> None:
    assert rendering.render_workflows(page) == b"[" + b",".join(map(reference, page)) + b"]"


def test_microseconds_and_their_absence_render_as_before() -> None:
    whole, fraction = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), datetime(2026, 1, 2, 3, 4, 5, 6)
    for at in (whole, fraction.replace(tzinfo=UTC)):
        w = Workflow.new(uuid4(), JsonDocument(DATA_TEXTS[2]), ("a",), at)
        assert rendering.render_workflow(w) == reference(w)
