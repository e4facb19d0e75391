"""The edge: parse and validate request bodies and queries (rendering.py renders workflows
as JSON).

Validation happens here and only here (cattrs, one converter built once; the JSON values
themselves in json_values.py, valid new workflows faster in fast_parse.py); the domain
receives values that are already known to be good.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from uuid import UUID

import attrs
import cattrs
import simplejson
from simplejson import RawJSON
from starlette.requests import ClientDisconnect

from workflows.adapters.csv_export.render import CsvTooLarge, check_csv_cells
from workflows.adapters.offload import Unwanted, offload
from workflows.domain.model import JsonDocument, WorkflowStatus
from workflows.entrypoints.fast_parse import parse_new_workflow_fast
from workflows.entrypoints.json_values import MAX_PROBLEMS, check_data, check_string, parse_json
from workflows.entrypoints.problems import Problem, error, invalid

T = TypeVar("T")

STATUSES = ", ".join(s.value for s in WorkflowStatus)


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


PARSE_ON_LOOP_MAX = 16 * 1024
"""Bytes of a POST body up to which it is parsed and checked on the event loop (under 1 ms
on a 2-core host); a larger one is parsed in a thread (`read_new_workflow`), so that one
large POST does not hold up every other request of its process (1 MiB: ~35 ms). The thread
holds the GIL while it works but hands it to the loop every switch interval
(asgi.THREAD_SWITCH_INTERVAL), except within one C call (orjson's parse: a few ms). It is
the process's one thread for such work (`adapters/offload.py`), shared with large CSV
renders: large POSTs at once are parsed one after another."""


async def read_new_workflow(
    body: bytes, still_wanted: Callable[[], Awaitable[bool]] | None = None
) -> tuple[JsonDocument, tuple[str, ...]]:
    """`parse_new_workflow`, in a thread for a body over PARSE_ON_LOOP_MAX, unless its
    client has gone when its turn comes (`still_wanted`): ClientDisconnect."""
    return await _parsed(parse_new_workflow, body, still_wanted)


async def _parsed(
    parse: Callable[[bytes], T], body: bytes, still_wanted: Callable[[], Awaitable[bool]] | None
) -> T:
    if len(body) <= PARSE_ON_LOOP_MAX:
        return parse(body)
    try:
        return await offload(parse, body, wanted=still_wanted)
    except Unwanted:
        raise ClientDisconnect from None


def parse_new_workflow(body: bytes) -> tuple[JsonDocument, tuple[str, ...]]:
    fast = parse_new_workflow_fast(body)
    return fast if fast is not None else _parse_new_workflow(body)


def _parse_new_workflow(body: bytes) -> tuple[JsonDocument, tuple[str, ...]]:
    """The reference: every check in Python, every error worded."""
    value = _structure(parse_json(body), NewWorkflow)
    problems: list[dict[str, str]] = []
    check_data(value.data, problems)
    if not problems:
        rows = value.data if isinstance(value.data, list) else [value.data]
        try:
            check_csv_cells(body, rows)
        except CsvTooLarge as exc:
            problems.append(error("/data", str(exc)))
    for index, step in enumerate(value.steps):
        pointer = f"/steps/{index}"
        if not step.strip():
            problems.append(error(pointer, "must not be empty or blank"))
        else:
            check_string(step, pointer, problems)
    if problems:
        raise Problem(422, _summary(problems), errors=problems)
    text = simplejson.dumps(value.data, use_decimal=True, ensure_ascii=False, separators=(",", ":"))
    return JsonDocument(text), tuple(value.steps)


def parse_status_patch(body: bytes) -> WorkflowStatus:
    patch: StatusPatch = _structure(parse_json(body), StatusPatch)
    return patch.status


async def read_status_patch(
    body: bytes, still_wanted: Callable[[], Awaitable[bool]] | None = None
) -> WorkflowStatus:
    """`parse_status_patch`, in a thread for a body over PARSE_ON_LOOP_MAX, as a POST's
    (README, `MAX_BODY_BYTES`): a PATCH of 1 MiB (a 422 once parsed) held the event loop
    0.24-0.38 s on this host."""
    return await _parsed(parse_status_patch, body, still_wanted)


def parse_idempotency_key(raw: str | None, sent: int = 1) -> str | None:
    """The Idempotency-Key header: a structured-field string (`"..."`), or bare, of 1 to
    255 printable ASCII characters; `sent` is how many times the header came."""
    if raw is None:
        return None
    if sent > 1:
        raise invalid("/header/Idempotency-Key", "is given more than once")
    key = raw.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not (1 <= len(key) <= 255 and key.isascii() and key.isprintable()):
        raise invalid("/header/Idempotency-Key", "must be 1 to 255 printable ASCII characters")
    return key


UUID_TEXT = re.compile(
    "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
"""A UUID as RFC 9562 writes it: 32 hex digits in groups of 8-4-4-4-12, either case."""


def parse_uuid(raw: str, pointer: str) -> UUID:
    """`raw` as a UUID, or a 422. Only the hyphenated form: Python's UUID() also takes
    braces, a `urn:uuid:` prefix, hyphens anywhere or none, and underscores or a sign
    (read by int()), which would make a malformed path name some other workflow."""
    if UUID_TEXT.fullmatch(raw) is None:
        raise invalid(pointer, f"{raw[:64]!r} is not a UUID (8-4-4-4-12 hex digits)")
    return UUID(raw)


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
                # Named as sent: a key may hold ".", "[" or nothing at all (pointer "/").
                escaped = key.replace("~", "~0").replace("/", "~1")
                problems.append(error(f"/{escaped}", "is not a known field"))
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


def _summary(problems: list[dict[str, str]]) -> str:
    first = problems[0]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    if len(problems) >= MAX_PROBLEMS:  # the check stopped there
        more = f" (and {len(problems) - 1} more listed; there may be others)"
    return f"{first['pointer'] or 'the body'} {first['message']}{more}"


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
