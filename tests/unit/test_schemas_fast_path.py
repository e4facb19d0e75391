"""parse_new_workflow's fast path against the reference (_parse_new_workflow), on bodies
written as clients write them, and as they should not: the same document or the same
Problem (status, detail, errors, type, title, headers) for every body.

Bodies are built as text, so that number tokens, escapes, whitespace, key order and
repeated keys are exactly as chosen.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
import simplejson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from workflows.entrypoints import fast_parse, json_values, schemas
from workflows.entrypoints.problems import Problem

SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r"}
SHORT_ESCAPES |= {"\t": "\\t", "/": "\\/"}


def outcome(parse: Any, body: bytes) -> tuple[Any, ...]:
    try:
        return ("ok", parse(body))
    except Problem as p:
        return (p.status, p.detail, p.errors, p.slug, p.title, p.headers)
    except Exception as exc:  # (none expected; compared all the same)
        return (type(exc), str(exc))


def assert_same(body: bytes) -> bool:
    """Both paths agree on body; whether the fast path answered."""
    expected = outcome(schemas._parse_new_workflow, body)
    assert outcome(schemas.parse_new_workflow, body) == expected
    fast = fast_parse.parse_new_workflow_fast(body)
    if fast is not None:
        assert ("ok", fast) == expected
    return fast is not None


# --- JSON text, token by token --------------------------------------------------------

whitespace = st.sampled_from(["", "", "", "", " ", "  ", "\n", "\n    ", "\t", "\r\n"])

digits = st.text("0123456789", min_size=1, max_size=70)
built_numbers = st.builds(
    lambda sign, whole, fraction, exponent: sign + whole + fraction + exponent,
    st.sampled_from(["", "", "-"]),
    st.one_of(
        st.just("0"), digits.map(lambda d: "1" + d[:20]), digits.filter(lambda d: d[0] > "0")
    ),
    st.one_of(st.just(""), digits.map(lambda d: "." + d)),
    st.one_of(
        st.just(""),
        st.just(""),
        st.builds(
            lambda e, s, d: e + s + d,
            st.sampled_from("eE"),
            st.sampled_from(["", "+", "-"]),
            st.sampled_from(["0", "5", "05", "16", "308", "400", "20000", "200000"]),
        ),
    ),
)
finite = st.floats(allow_nan=False, allow_infinity=False)
numbers: st.SearchStrategy[str] = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.sampled_from(["0", "-0", "-0.0", "1.0", "1.50", "4673.00", "1e5", "0e200000"]),
    finite.map(repr),
    finite.map(lambda f: orjson.dumps(f).decode()),
    built_numbers,
    st.builds(  # as sent, not as orjson writes it: "12.50"
        lambda whole, fraction: f"{whole}.{fraction}0",
        st.integers(min_value=-(10**6), max_value=10**6),
        st.text("0123456789", max_size=5),
    ),
)

# Characters: any (lone surrogates included, escaped), written raw or escaped in any way.
characters = st.one_of(
    st.characters(codec="utf-8"),
    st.sampled_from('"\\'),
    st.sampled_from('"\\/\b\f\n\r\t\x00\x01\x1f\x7f\u2028\u2029\ufeff\xa0 :,[]{}eE0.-'),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
    st.characters(min_codepoint=0x10000),
)


def escape(char: str, style: int) -> str:
    code = ord(char)
    if style == 1 and char in SHORT_ESCAPES:
        return SHORT_ESCAPES[char]
    if style == 2 and code > 0xFFFF:  # as a surrogate pair
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04X}"
    if style in (2, 3) and code <= 0xFFFF:
        return f"\\u{code:04x}" if style == 2 else f"\\u{code:04X}"
    if 0xD800 <= code <= 0xDFFF:
        return f"\\u{code:04x}"
    if style == 4:  # raw, even where JSON does not allow it
        return char
    return simplejson.dumps(char, ensure_ascii=False)[1:-1]


@st.composite
def strings(
    draw: st.DrawFn, pool: st.SearchStrategy[str] | None = None, exact: bool = False
) -> str:
    if pool is not None and (exact or draw(st.integers(0, 4))):
        chars = list(draw(pool))
    else:
        chars = draw(st.lists(characters, max_size=8))
    styles = st.sampled_from([0, 0, 0, 0, 1, 2, 3, 4] if draw(st.booleans()) else [0])
    return '"' + "".join(escape(char, draw(styles)) for char in chars) + '"'


keys = st.sampled_from(["a", "b", "id", "data", "steps", "é", "k:1", "x y", "0e1", "[{"])


@st.composite
def values(draw: st.DrawFn, depth: int = 0) -> str:
    kind = draw(st.sampled_from(["number", "string", "literal", "array", "object"]))
    if depth >= 4 and kind in ("array", "object"):
        kind = "number"
    if kind == "number":
        return draw(numbers)
    if kind == "string":
        return draw(strings())
    if kind == "literal":
        return draw(st.sampled_from(["true", "false", "null"]))
    if kind == "array":
        items = draw(st.lists(values(depth + 1), max_size=4))
        return wrap(draw, "[", items, "]")
    return draw(objects(depth + 1))


@st.composite
def objects(draw: st.DrawFn, depth: int = 0) -> str:
    unique = draw(st.integers(0, 3)) > 0  # a key repeated, now and then
    names = draw(st.lists(st.one_of(keys, st.text(max_size=3)), max_size=4, unique=unique))
    pairs = [(draw(strings(st.just(name))), draw(values(depth + 1))) for name in names]
    ws = whitespace
    return wrap(draw, "{", [k + draw(ws) + ":" + draw(ws) + v for k, v in pairs], "}")


def wrap(draw: st.DrawFn, opening: str, items: list[str], closing: str) -> str:
    inner = ("," + draw(whitespace)).join(items)
    return opening + draw(whitespace) + inner + draw(whitespace) + closing


@st.composite
def nested(draw: st.DrawFn) -> str:
    """An object holding a value nested around MAX_DEPTH levels deep."""
    levels = draw(
        st.integers(min_value=json_values.MAX_DEPTH - 3, max_value=json_values.MAX_DEPTH + 2)
    )
    text = draw(st.sampled_from(["1", "{}", "[]", '"x"']))
    for _ in range(levels):
        text = '{"n":' + text + "}" if draw(st.booleans()) else "[" + text + "]"
    siblings = draw(st.integers(min_value=0, max_value=70))  # more brackets, not deeper
    return '{"deep":' + text + ',"wide":[' + ",".join(["{}"] * siblings) + "]}"


@st.composite
def number_rows(draw: st.DrawFn) -> str:
    """An object of numbers, as invoices are."""
    names = draw(st.lists(keys, min_size=1, max_size=5, unique=True))
    ws = whitespace
    members = [
        draw(strings(st.just(name))) + draw(ws) + ":" + draw(ws) + draw(numbers) for name in names
    ]
    return wrap(draw, "{", members, "}")


data_values = st.one_of(
    objects(),
    number_rows(),
    st.lists(number_rows(), min_size=1, max_size=3).map(lambda rows: "[" + ",".join(rows) + "]"),
    st.lists(objects(), min_size=1, max_size=3).map(lambda rows: "[" + ",".join(rows) + "]"),
    nested(),
    values(),
)
step_lists = st.lists(
    st.one_of(strings(), strings(), st.sampled_from(['""', '" "', '"\\u00a0"', "1"])), max_size=3
).map(lambda steps: "[" + ",".join(steps) + "]")
step_values = st.one_of(step_lists, step_lists, step_lists, values())


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    pairs = [("data", draw(data_values))]
    if draw(st.booleans()):
        pairs.append(("steps", draw(step_values)))
    if not draw(st.integers(0, 3)):  # now and then, a member not allowed, or repeated
        extra = st.sampled_from(["data", "steps", "uuid", "status", "other"])
        pairs.extend((name, draw(values())) for name in draw(st.lists(extra, max_size=2)))
    pairs = draw(st.permutations(pairs))
    members = [draw(strings(st.just(name), exact=True)) + ":" + value for name, value in pairs]
    body = draw(whitespace) + wrap(draw, "{", members, "}") + draw(whitespace)
    return body.encode("utf-8", "surrogatepass")


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    body = bytearray(draw(bodies()))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        at = draw(st.integers(min_value=0, max_value=len(body)))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = draw(st.one_of(st.sampled_from(b'"\\{}[],:0e-. \x00\xff\xc3'), st.integers(0, 255)))
        if action == "insert":
            body.insert(at, byte)
        elif at < len(body):
            body[at : at + 1] = b"" if action == "delete" else bytes([byte])
    return bytes(body)


# --- properties ---------------------------------------------------------------------


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies())
@example(b'{"data":{"name":"invoice","total":4673.00,"paid":false},"steps":["extract"]}')
@example(b'{"steps":["a"],"data":[{"x":-0},{"y":1.0}]}')
@example(b'{"data":{"a":1,"a":2}}')
@example(b'{"data":{"a":{"k":1},"a":{"k":1,"j":2}}}')
@example(b'{"data":{"a":"\\u00e9\\/"},"steps":["\\u0041"]}')
@example(b'{"data":{"a":"\\ud83d\\ude00","b":"\\ud800"}}')
@example(b'{"data":{"a":"\\u0000"}}')
@example(b'{"data":{"a\\u0000":1}}')
@example(b'{"data":{"q":"say \\"hi\\" \\\\","n":1.50}, "steps": ["\\\\\\""]}')
@example(b'{"data" : {"q": "\\"", "r": "\\\\", "n": 1.50 } }')
@example(b'{"d\\u0061ta":{"n":1.50}}')
@example(b'{"data":{"a":' + b"[" * 300 + b"]" * 300 + b"}}")
@example(b'{"data":{"n":1e-20000}}')
@example(b'{"data":{"n":0e200000}}')
@example(b'{"data":{"n":1e400}}')
@example(b'{"data":{"n":18446744073709551616}}')
@example(b'{"data":{"n":NaN}}')
@example(b'{"data":{"n":-Infinity}}')
@example(b'{"data":{},"uuid":"x","status":"queued"}')
@example(b'{"data":{},"other":1}')
@example(b'{"data":{},"steps":[""," ","\\u00a0"]}')
@example(b'{"data":{},"steps":"a"}')
@example(b'{"data":[]}')
@example(b'{"data":[{},1]}')
@example(b'{"data":"x"}')
@example(b"[]")
@example(b"")
@example(b" \n ")
@example(b'\xef\xbb\xbf{"data":{}}')
@example(b'{"data":{"a":"\xed\xa0\x80"}}')
@example(b'{"data":{"a":"\xff"}}')
def test_fast_path_matches_the_reference(body: bytes) -> None:
    assert_same(body)


@settings(max_examples=600, deadline=None)
@given(mutated())
def test_damaged_bodies_match_the_reference(body: bytes) -> None:
    assert_same(body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_match_the_reference(body: bytes) -> None:
    assert_same(body)


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
        ),
        max_leaves=20,
    ),
    st.booleans(),
    st.sampled_from([None, 2]),
)
def test_serialized_documents_match_the_reference(
    data: Any, ascii: bool, indent: int | None
) -> None:
    body = json.dumps(
        {"data": [data] if isinstance(data, dict) else {"v": data}, "steps": ["s"]},
        ensure_ascii=ascii,
        indent=indent,
    )
    assert_same(body.encode("utf-8", "surrogatepass"))


# --- the fast path is taken, and right, for the bodies clients send -----------------

TAKEN = [
    b'{"data":{"name":"invoice-2026-11","total":4673.00,"qty":3.5},"steps":["extract","load"]}\n',
    b'{\n  "steps": ["a", "b"],\n  "data": [\n    {"id": 1, "ok": true, "none": null}\n  ]\n}',
    b'{"data": {"id": 1, "price": 1.5, "name": "Troms\\u00f8"}, "steps": ["x"]}',
    b'{"data":{"quote":"he said \\"hi\\"\\n\\tbye \\\\ \\u001f","x":[1,2,{"y":[]}]}}',
    b'{"data":{"deep":' + b"[" * 62 + b"1" + b"]" * 62 + b', "wide": [' + b"{}," * 80 + b"{}]}}",
    b'{"data":[' + b",".join(b'{"row": %d, "amount": %d.25}' % (i, i) for i in range(100)) + b"]}",
    b'{"data":{"\xc3\xa9\xe2\x80\xa8\xf0\x9f\x98\x80":"\x7f"}}',
]


@pytest.mark.parametrize("body", TAKEN)
def test_common_bodies_take_the_fast_path(body: bytes) -> None:
    assert assert_same(body)


NOT_TAKEN = [
    b'{"data":{"n":1.5e3}}',  # an exponent: the reference checks the number
    b'{"data":{"n":0.' + b"0" * 16383 + b"1}}",  # too precise to store
    b'{"data":{"n":1' + b"0" * 70 + b"}}",  # 64 digits or more
    b'{"data":{"deep":' + b"[" * 63 + b"1" + b"]" * 63 + b', "wide": [' + b"{}," * 80 + b"{}]}}",
    b'{"data":{"a":1,"a":1}}',
    b'{"data": {"a": "\\u00e9", "n": 2.50}}',  # an escape rewritten and a number kept
]


@pytest.mark.parametrize("body", NOT_TAKEN)
def test_bodies_left_to_the_reference(body: bytes) -> None:
    assert not assert_same(body)


def test_orjson_writes_every_string_as_simplejson_does() -> None:
    """The premise of the fast path: the two escape exactly the same characters, alike."""
    for code in range(0x110000):
        if 0xD800 <= code <= 0xDFFF:
            continue
        char = chr(code)
        expected = simplejson.dumps(char, ensure_ascii=False).encode()
        assert orjson.dumps(char) == expected, hex(code)
