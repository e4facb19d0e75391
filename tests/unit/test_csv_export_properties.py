"""CsvExporter against a small reference of the rules in docs/csv.md, on generated JSON.

The documents are built as a client would send them: JSON text with number tokens
written out verbatim, so exactness is checked against the characters sent.
"""

from __future__ import annotations

import csv
import io
import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from unittest import mock

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workflows.adapters.csv_export import render as csv_render
from workflows.domain.model import JsonDocument, Workflow


@attrs.frozen
class Num:
    token: str


Value = None | bool | str | Num | list["Value"] | dict[str, "Value"]
Row = dict[str, Value]
Document = Row | list[Row]

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
JSON_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")

# --- the client's JSON text ---------------------------------------------------------


def to_json(value: object, ascii_escapes: bool = False) -> str:
    if isinstance(value, Num):
        return value.token
    if isinstance(value, list):
        return "[" + ",".join(to_json(v, ascii_escapes) for v in value) + "]"
    if isinstance(value, dict):
        members = (
            json.dumps(k, ensure_ascii=ascii_escapes) + ":" + to_json(v, ascii_escapes)
            for k, v in value.items()
        )
        return "{" + ",".join(members) + "}"
    return json.dumps(value, ensure_ascii=ascii_escapes)


# --- the reference: the rules of docs/csv.md, written as plainly as possible ------


def neutralise(text: str) -> str:
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def expected_cell(value: Value) -> str:
    if value is None:
        return ""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, Num):
        return value.token
    if isinstance(value, str):
        return neutralise(value)
    return to_json(value)


def leaves(obj: Row, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Value]]:
    for key, value in obj.items():
        path = (*prefix, key)
        if isinstance(value, dict) and value:
            yield from leaves(value, path)
        else:
            yield path, value


def reference(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    paths: list[tuple[str, ...]] = []
    for row in rows:
        for path, _ in leaves(row):
            if path not in paths:
                paths.append(path)
    header: list[str] = []
    for path in paths:
        name = neutralise(".".join(path))
        if name in header:
            suffix = 2
            while f"{name}~{suffix}" in header:
                suffix += 1
            name = f"{name}~{suffix}"
        header.append(name)
    body = []
    for row in rows:
        cells = {path: expected_cell(value) for path, value in leaves(row)}
        body.append([cells.get(path, "") for path in paths])
    return header, body


def rows_of(document: Document) -> list[Row]:
    return document if isinstance(document, list) else [document]


# --- generated documents ------------------------------------------------------------

special_characters = ['"', "'", ",", "\r\n", "\r", "\n", "\t", " ", "\x00", "\ufeff", "\u2028"]
formula_like = ["=", "+", "-", "@", "=1+2", "-5", "@SUM(A1)"]
name_parts = [".", "~2", "a", "é", "🚆"]
tricky_pieces = st.sampled_from([*special_characters, *formula_like, *name_parts])
strings = st.one_of(st.text(), st.lists(tricky_pieces, max_size=6).map("".join))
# Few names, so that many collide, and the names that need care at the start of a file.
crowded_keys = st.sampled_from(
    ["a", "b", "b~2", "a.b", "a.b~2", "a~2", "=a", "'=a", "'=a~2", "", "\ufeff"]
)
keys = st.one_of(crowded_keys, st.text(alphabet="ab.~2='-", max_size=4), strings)
numbers = st.one_of(
    st.from_regex(JSON_NUMBER, fullmatch=True),
    st.integers().map(str),
    st.decimals(allow_nan=False, allow_infinity=False).map(str),
    st.tuples(st.sampled_from(["", "-"]), st.integers(4300, 5000)).map(
        lambda sign_digits: sign_digits[0] + "7" * sign_digits[1]
    ),
).map(Num)
scalars = st.one_of(st.none(), st.booleans(), numbers, strings)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)
    ),
    max_leaves=12,
)


def nest(value: Value, wrappers: list[tuple[bool, str]]) -> Value:
    for as_object, key in wrappers:
        value = {key: value} if as_object else [value]
    return value


wrapper_keys = st.sampled_from(["a", "b", "a.b", "", "=x", "~2"])
deep_values = st.builds(nest, values, st.lists(st.tuples(st.booleans(), wrapper_keys), max_size=40))
crowded_values = st.recursive(
    scalars, lambda children: st.dictionaries(crowded_keys, children, max_size=4), max_leaves=8
)
rows = st.one_of(
    st.dictionaries(keys, st.one_of(values, deep_values), max_size=5),
    st.dictionaries(crowded_keys, crowded_values, max_size=6),
)
documents = st.one_of(rows, st.lists(rows, min_size=1, max_size=4))


def render(document: Document, ascii_escapes: bool) -> bytes:
    data = JsonDocument(to_json(document, ascii_escapes))
    item = Workflow.new(uuid.uuid4(), data, (), datetime.now(UTC))
    return csv_render.render_csv(item.data.text)  # what CsvExporter.render gives


def read(content: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(content.decode("utf-8"), newline="")))


property_settings = settings(max_examples=200, deadline=None)

# --- properties ---------------------------------------------------------------------


@property_settings
@given(documents, st.booleans())
def test_header_and_cells_follow_the_flattening_rules(
    document: Document, ascii_escapes: bool
) -> None:
    header, body = reference(rows_of(document))
    assert read(render(document, ascii_escapes)) == [header, *body]


@property_settings
@given(documents)
def test_names_are_unique_numbers_exact_and_formula_starts_neutralised(
    document: Document,
) -> None:
    header, *body = read(render(document, False))
    assert len(set(header)) == len(header)
    assert not any(name.startswith(FORMULA_STARTS) for name in header)

    columns: dict[tuple[str, ...], int] = {}
    for row in rows_of(document):
        for path, _ in leaves(row):
            columns.setdefault(path, len(columns))
    for record, row in zip(body, rows_of(document), strict=True):
        for path, value in leaves(row):
            if isinstance(value, Num):
                assert record[columns[path]] == value.token
        for cell in record:
            if cell.startswith(FORMULA_STARTS):
                assert JSON_NUMBER.fullmatch(cell), f"{cell!r} could run as a formula"


@property_settings
@given(documents, st.booleans())
def test_output_is_utf8_without_bom_and_lines_end_with_crlf(
    document: Document, ascii_escapes: bool
) -> None:
    content = render(document, ascii_escapes)
    assert not content.startswith(b"\xef\xbb\xbf")
    text = content.decode("utf-8")
    assert text.endswith("\r\n")
    outside_quotes = "".join(text.split('"')[::2])  # quotes are balanced: doubled or paired
    assert "\r" not in outside_quotes.replace("\r\n", "")
    assert "\n" not in outside_quotes.replace("\r\n", "")
    assert outside_quotes.count("\r\n") == 1 + len(rows_of(document))


@property_settings
@given(values.filter(lambda value: isinstance(value, list | dict)), st.booleans())
def test_an_array_or_object_cell_is_written_as_the_work_list_writes_it(
    value: Value, ascii_escapes: bool
) -> None:
    """The orjson path (numbers as Fragments of their tokens) against the work list."""
    raw = csv_render._Raw
    parsed = json.loads(to_json(value, ascii_escapes), parse_int=raw, parse_float=raw)
    assert csv_render._compact_json(parsed) == csv_render._compact_json_slowly(parsed)


def test_an_ordinary_cell_is_written_by_orjson(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(value: object) -> str:
        raise AssertionError("the work list was used")

    monkeypatch.setattr(csv_render, "_compact_json_slowly", refuse)
    data = '{"a":[1.50,-0,1e5,"x\\u0001",{"b":null,"c":[true,false]}]}'
    assert read(render_text(data)) == [
        ["a"],
        ['[1.50,-0,1e5,"x\\u0001",{"b":null,"c":[true,false]}]'],
    ]


def render_text(text: str) -> bytes:
    item = Workflow.new(uuid.uuid4(), JsonDocument(text), (), datetime.now(UTC))
    return csv_render.render_csv(item.data.text)  # what CsvExporter.render gives


@property_settings
@given(documents, st.integers(min_value=0, max_value=60))
def test_a_csv_over_the_cell_limit_is_refused_by_intake_check_and_render_alike(
    document: Document, limit: int
) -> None:
    text = to_json(document)
    header, body = reference(rows_of(document))
    over = (len(body) + 1) * len(header) > limit
    parsed = json.loads(text, parse_int=str, parse_float=str)  # only the shape counts
    with mock.patch.object(csv_render, "MAX_CSV_CELLS", limit):
        for check in (
            lambda: csv_render.check_csv_cells(text.encode(), rows_of(parsed)),
            lambda: csv_render.render_csv(text),
        ):
            if over:
                with pytest.raises(csv_render.CsvTooLarge) as refused:
                    check()
                assert (refused.value.rows, refused.value.columns) == (len(body) + 1, len(header))
            else:
                check()


def test_a_stored_document_whose_header_is_over_the_limit_is_refused_before_its_names() -> None:
    """A workflow stored before intake checked the header: its render raises at once
    instead of building names of 20 MB (the audit's 136 KB took 2 GB)."""
    inner = ",".join(f'"{i:x}":1' for i in range(5_000))
    text = '{"' + "K" * 4_000 + '": {' + inner + "}}"
    built: list[str] = []
    real_child = csv_render._Path.child

    def spy(self: csv_render._Path, key: str) -> csv_render._Path:
        built.append(key)
        return real_child(self, key)

    with (
        mock.patch.object(csv_render._Path, "child", spy),
        pytest.raises(csv_render.CsvTooLarge, match="bytes of column names"),
    ):
        csv_render.render_csv(text)
    assert built == []
    with mock.patch.object(csv_render, "MAX_CSV_HEADER_BYTES", 14):  # "a.b" + "a.cc" + ...
        csv_render.check_csv_cells(
            b'{"a":{"b":1,"cc":2},"ddddddd":3}', [{"a": {"b": 1, "cc": 2}, "ddddddd": 3}]
        )
        with pytest.raises(csv_render.CsvTooLarge):
            csv_render.check_csv_cells(
                b'{"a":{"b":1,"cc":2},"dddddddd":3}', [{"a": {"b": 1, "cc": 2}, "dddddddd": 3}]
            )
