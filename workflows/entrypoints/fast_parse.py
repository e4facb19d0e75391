"""The fast path of parse_new_workflow (schemas.py): a valid new workflow's body read in a
few C calls (orjson) rather than Python work per value."""

from __future__ import annotations

import re

import orjson

from workflows.adapters.csv_export.render import CsvTooLarge, check_csv_cells
from workflows.domain.model import JsonDocument
from workflows.entrypoints.json_values import MAX_DEPTH

_WHITESPACE = b" \t\n\r"
# A backslash that does not start an escape the way simplejson writes one (it escapes `"`,
# `\` and control characters, the latter as lowercase \u00xx, and writes all else as is).
_OTHER_ESCAPE = re.compile(rb'\\(?![\\"bfnrt]|u00(?:0[1-7bef]|1[0-9a-f]))')
# Indented by orjson, a value nested n levels deep starts a line with 2n spaces.
_TOO_DEEP = b"\n" + b" " * (2 * MAX_DEPTH + 2)
_NOT_NUMBER = bytes(sorted(set(range(256)) - set(b"0123456789.eE+-,:[]{}")))
_LONG_NUMBER = b"0" * 64
_NUMBER_MARKS = bytes(  # digits and "." as "0", "e" and "E" as "e", all else " "
    b"0"[0] if chr(c) in "0123456789." else b"e"[0] if chr(c) in "eE" else b" "[0]
    for c in range(256)
)


def parse_new_workflow_fast(body: bytes) -> tuple[JsonDocument, tuple[str, ...]] | None:
    """What schemas._parse_new_workflow returns for a valid body, in a few C calls over the
    whole text rather than Python work per value; None whenever the result could differ in
    any way (an invalid body, a duplicate key, deep nesting, an exponent...): the reference
    then answers. orjson parses, and checks JSON and UTF-8."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(value) is not dict or "data" not in value or not value.keys() <= {"data", "steps"}:
        return None
    data, steps = value["data"], value.get("steps", [])
    rows = [data] if type(data) is dict else data if type(data) is list else []
    if not rows or not all(type(row) is dict for row in rows):
        return None
    try:
        check_csv_cells(body, rows)
    except CsvTooLarge:
        return None
    if type(steps) is not list or not all(type(step) is str and step.strip() for step in steps):
        return None
    if b"\\u0000" in body:  # a NUL (raw, it is not JSON; unpaired surrogates orjson refuses)
        return None
    try:
        whole = orjson.dumps(value)
    except orjson.JSONEncodeError:  # nested too deeply for orjson
        return None
    if body.count(b"{") + body.count(b"[") > MAX_DEPTH and (  # (counted in strings too)
        _TOO_DEEP in orjson.dumps(value, option=orjson.OPT_INDENT_2)
    ):
        return None
    body = body.strip(_WHITESPACE)
    if b"\\" not in body or _OTHER_ESCAPE.search(body) is None:
        # Every string is written as simplejson (and orjson, alike) writes it: the strings
        # are the same in body and whole, and what else may differ is outside them. A
        # repeated key, kept once by orjson: one ':' fewer. Whitespace. Numbers, as sent in
        # body, as orjson writes them in whole: each stands between the same structural
        # characters in both, so with all else dropped the texts are equal if they all are.
        if body.count(b":") != whole.count(b":"):
            return None
        if _blanks(body) == _blanks(whole) and not _odd_numbers(body):
            text = body
        elif body.translate(None, _NOT_NUMBER) == whole.translate(None, _NOT_NUMBER):
            text = whole
        else:
            skeleton, text = _compact(body)
            if _odd_numbers(skeleton):
                return None
    elif _compact(body)[0] == _compact(whole)[0]:  # no key lost, numbers as orjson writes
        text = whole
    else:
        return None
    if "steps" not in value:
        head, tail = b'{"data":', b"}"
    elif text.startswith(b'{"data":'):
        head, tail = b'{"data":', b',"steps":' + orjson.dumps(steps) + b"}"
    else:
        head, tail = b'{"steps":' + orjson.dumps(steps) + b',"data":', b"}"
    if not (text.startswith(head) and text.endswith(tail)):
        return None
    return JsonDocument(text[len(head) : len(text) - len(tail)].decode()), tuple(steps)


def _compact(text: bytes) -> tuple[bytes, bytes]:
    """(Valid JSON text outside its strings, whitespace dropped, a NUL for each string;
    the text without whitespace outside strings.)"""
    masked = text
    if b'\\"' in text:  # mask escaped quotes (and backslashes), keeping every offset
        masked = text.replace(b"\\\\", b"\x01\x01").replace(b'\\"', b"\x02\x02")
    parts = masked.split(b'"')  # strings are the odd parts
    outside = b"\x00".join(parts[::2])
    skeleton = outside.translate(None, _WHITESPACE)
    if len(skeleton) == len(outside):
        return skeleton, text
    parts[::2] = skeleton.split(b"\x00")
    compact = b'"'.join(parts)
    if masked is not text:
        compact = compact.replace(b"\x02\x02", b'\\"').replace(b"\x01\x01", b"\\\\")
    return skeleton, compact


def _blanks(text: bytes) -> int:
    return len(text) - len(text.translate(None, _WHITESPACE))


def _odd_numbers(text: bytes) -> bool:
    """Whether text may hold a number with an exponent or of 64 digits and dots or more, as
    any too large or too precise to store is (strings count too, unless text is a skeleton)."""
    marked = text.translate(_NUMBER_MARKS)
    return b"0e" in marked or _LONG_NUMBER in marked
