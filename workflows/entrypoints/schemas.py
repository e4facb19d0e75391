"""The edge: parse and validate request bodies and queries, render workflows as JSON.

Validation happens here and only here (cattrs, one converter built once); the domain
receives values that are already known to be good.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any
from uuid import UUID

import attrs
import cattrs
import orjson
import simplejson
from simplejson import RawJSON

from workflows.domain.model import JsonDocument, Workflow, WorkflowStatus
from workflows.entrypoints.problems import Problem, error, invalid

MAX_DEPTH = 64
# PostgreSQL's numeric (which JSONB numbers are) holds these many digits at most.
MAX_INTEGER_DIGITS = 131072
MAX_FRACTION_DIGITS = 16383
STATUSES = ", ".join(s.value for s in WorkflowStatus)

# The fast path of parse_new_workflow (see _parse_new_workflow_fast).
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


@attrs.frozen
class NewWorkflow:
    data: Any
    steps: list[str] = attrs.field(factory=list)


@attrs.frozen
class StatusPatch:
    status: WorkflowStatus


def _strict_str(value: Any, _: type) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {_json_type(value)}")
    return value


def _status(value: Any, _: type) -> WorkflowStatus:
    try:
        return WorkflowStatus(value)
    except (ValueError, TypeError):
        raise ValueError(f"must be one of {STATUSES}") from None


converter = cattrs.Converter(forbid_extra_keys=True)
converter.register_structure_hook(str, _strict_str)
converter.register_structure_hook(WorkflowStatus, _status)
converter.register_structure_hook(Any, lambda value, _: value)
_structure_steps = converter.get_structure_hook(list[str])


def _strict_list(value: Any, type_: Any) -> list[str]:
    if not isinstance(value, list):
        raise ValueError(f"must be an array of strings, not {_json_type(value)}")
    steps: list[str] = _structure_steps(value, type_)
    return steps


converter.register_structure_hook_func(lambda t: t == list[str], _strict_list)


def parse_json(body: bytes) -> Any:
    """The body as JSON values, numbers kept as the text the client sent; 400 when it is
    not JSON."""
    if not body.strip():
        raise Problem(400, "the request body is empty; send a JSON object", slug="empty-body")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Problem(400, f"the body is not valid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(
            text,
            parse_float=RawJSON,
            parse_int=RawJSON,
            parse_constant=_reject_constant,
            object_pairs_hook=_unique_keys,
        )
    except json.JSONDecodeError as exc:
        raise Problem(
            400, f"the body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        raise invalid("", f"JSON is nested too deeply (at most {MAX_DEPTH} levels)") from None


def parse_new_workflow(body: bytes) -> tuple[JsonDocument, tuple[str, ...]]:
    fast = _parse_new_workflow_fast(body)
    return fast if fast is not None else _parse_new_workflow(body)


def _parse_new_workflow(body: bytes) -> tuple[JsonDocument, tuple[str, ...]]:
    """The reference: every check in Python, every error worded."""
    value = _structure(parse_json(body), NewWorkflow)
    problems: list[dict[str, str]] = []
    _check_data(value.data, problems)
    for index, step in enumerate(value.steps):
        pointer = f"/steps/{index}"
        if not step.strip():
            problems.append(error(pointer, "must not be empty or blank"))
        else:
            _check_string(step, pointer, problems)
    if problems:
        raise Problem(422, _summary(problems), errors=problems)
    text = simplejson.dumps(value.data, use_decimal=True, ensure_ascii=False, separators=(",", ":"))
    return JsonDocument(text), tuple(value.steps)


def _parse_new_workflow_fast(body: bytes) -> tuple[JsonDocument, tuple[str, ...]] | None:
    """What _parse_new_workflow returns for a valid body, in a few C calls over the whole
    text rather than Python work per value; None whenever the result could differ in any
    way (an invalid body, a duplicate key, deep nesting, an exponent...): the reference
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


def parse_status_patch(body: bytes) -> WorkflowStatus:
    patch: StatusPatch = _structure(parse_json(body), StatusPatch)
    return patch.status


def parse_idempotency_key(raw: str | None) -> str | None:
    """The Idempotency-Key header: a structured-field string (`"..."`), or bare, of 1 to
    255 printable ASCII characters."""
    if raw is None:
        return None
    key = raw.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not (1 <= len(key) <= 255 and key.isascii() and key.isprintable()):
        raise invalid("/header/Idempotency-Key", "must be 1 to 255 printable ASCII characters")
    return key


def parse_uuid(raw: str, pointer: str) -> UUID:
    try:
        return UUID(raw)
    except ValueError:
        raise invalid(pointer, f"{raw[:64]!r} is not a UUID") from None


def render_workflow(workflow: Workflow) -> bytes:
    return orjson.dumps(_as_json(workflow), option=orjson.OPT_UTC_Z)


def render_workflows(workflows: list[Workflow]) -> bytes:
    return orjson.dumps([_as_json(workflow) for workflow in workflows], option=orjson.OPT_UTC_Z)


def _as_json(w: Workflow) -> dict[str, object]:
    """The workflow as orjson serialises it: `data` is copied as its exact stored text (a
    Fragment), uuids and timestamps (UTC, `Z`) are orjson's own. One dumps call for a whole
    page: about 11 x faster than joining the pieces (bench/notes.md)."""
    return {
        "uuid": w.uuid,
        "status": w.status.value,
        "data": orjson.Fragment(w.data.text),
        "steps": w.steps,
        "created_at": w.created_at,
        "updated_at": w.updated_at,
        "delivery_attempts": w.delivery_attempts,
        "dead_lettered_at": w.dead_lettered_at,
    }


def _structure(value: Any, cls: type[Any]) -> Any:
    if not isinstance(value, dict):
        raise invalid("", f"the body must be a JSON object, not {_json_type(value)}")
    server_fields = sorted({"uuid", "status", "created_at", "updated_at"} & value.keys())
    if cls is NewWorkflow and server_fields:
        problems = [error(f"/{name}", "is assigned by the server") for name in server_fields]
        raise Problem(422, _summary(problems), errors=problems)
    try:
        return converter.structure(value, cls)
    except Exception as exc:
        problems = _cattrs_problems(exc, value)
        raise Problem(422, _summary(problems), errors=problems) from None


def _cattrs_problems(exc: Exception, body: dict[str, Any]) -> list[dict[str, str]]:
    problems: list[dict[str, str]] = []
    for message in cattrs.transform_error(exc, path="$", format_exception=_describe):
        text, _, path = message.rpartition(" @ ")
        if text.startswith("extra fields found"):
            allowed = {field.name for field in attrs.fields(_target_of(exc))}
            for key in sorted(set(body) - allowed):
                problems.append(error(_pointer(f"$.{key}"), "is not a known field"))
        else:
            problems.append(error(_pointer(path), text))
    return problems


def _target_of(exc: Exception) -> Any:
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return exc.cl
    if isinstance(exc, cattrs.BaseValidationError):
        for inner in exc.exceptions:
            if isinstance(inner, Exception):
                return _target_of(inner)
    return NewWorkflow


def _describe(exc: BaseException, _type: Any) -> str:
    if isinstance(exc, KeyError):
        return "is required"
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return "extra fields found"
    if isinstance(exc, ValueError | TypeError) and str(exc).startswith("must"):
        return str(exc)
    if isinstance(exc, TypeError | ValueError):
        return "must be an array of strings" if "list" in str(_type) else "has the wrong type"
    return str(exc)


def _pointer(path: str) -> str:
    """`$.steps[0]` → `/steps/0` (RFC 6901)."""
    out = path.removeprefix("$").replace("[", ".").replace("]", "")
    parts = [p.replace("~", "~0").replace("/", "~1") for p in out.split(".") if p]
    return "".join(f"/{p}" for p in parts)


def _check_data(data: Any, problems: list[dict[str, str]]) -> None:
    rows = [data] if isinstance(data, dict) else data if isinstance(data, list) else []
    if not rows:
        problems.append(
            error("/data", "must be a JSON object or a non-empty array of JSON objects")
        )
    elif bad := [i for i, row in enumerate(rows) if not isinstance(row, dict)]:
        problems.append(error(f"/data/{bad[0]}", "must be a JSON object"))
    else:
        _check_value(data, "/data", 1, problems)


def _check_value(value: Any, pointer: str, depth: int, problems: list[dict[str, str]]) -> None:
    if len(problems) >= 20:
        return
    if depth > MAX_DEPTH:
        problems.append(error(pointer, f"nests deeper than {MAX_DEPTH} levels"))
    elif isinstance(value, dict):
        for key, item in value.items():
            child = f"{pointer}/{key.replace('~', '~0').replace('/', '~1')}"
            _check_string(key, child, problems, what="key")
            _check_value(item, child, depth + 1, problems)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_value(item, f"{pointer}/{index}", depth + 1, problems)
    elif isinstance(value, str):
        _check_string(value, pointer, problems)
    elif isinstance(value, RawJSON):
        number = Decimal(value.encoded_json)
        integer_digits = number.adjusted() + 1
        exponent = number.as_tuple().exponent
        fraction_digits = -exponent if isinstance(exponent, int) and exponent < 0 else 0
        if integer_digits > MAX_INTEGER_DIGITS or fraction_digits > MAX_FRACTION_DIGITS:
            problems.append(error(pointer, "number is too large or too precise to store"))


def _check_string(
    value: str, pointer: str, problems: list[dict[str, str]], what: str = "string"
) -> None:
    if "\x00" in value:
        problems.append(error(pointer, f"{what} contains a NUL character (\\u0000)"))
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        problems.append(error(pointer, f"{what} contains an unpaired UTF-16 surrogate"))


def _summary(problems: list[dict[str, str]]) -> str:
    first = problems[0]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{first['pointer'] or 'the body'} {first['message']}{more}"


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise Problem(
            422, f"duplicate key {duplicate!r} in a JSON object", slug="validation-failed"
        )
    return result


def _reject_constant(name: str) -> Any:
    raise Problem(400, f"{name} is not valid JSON (numbers must be finite)")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, RawJSON):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
