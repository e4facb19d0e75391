"""Request inputs read the same way by the Starlette handlers (http.py) and the hot
routes (hot.py): the JSON body, the consume call's query and the list's query."""

from __future__ import annotations

import re
from decimal import Decimal
from urllib.parse import urlencode
from uuid import UUID

from starlette.datastructures import QueryParams
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from workflows.domain.model import WorkflowStatus
from workflows.entrypoints import schemas
from workflows.entrypoints.problems import Problem, invalid

JSON = "application/json"
JSON_SUFFIXED = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*\+json")
"""A structured-syntax JSON type, as `application/merge-patch+json` (RFC 6839)."""
MAX_WAIT_SECONDS = 20
LIST_PARAMETERS = frozenset({"status", "limit", "after", "dead_lettered"})


async def receive_json_body(
    receive: Receive,
    content_types: list[str],
    declared: str,
    limit: int,
    *,
    patch: bool = False,
    codings: list[str] | None = None,
) -> bytes:
    """Read a request body off `receive`: refused before reading when it has more than one
    Content-Type line (400: `content_types` holds every line's value), when its declared
    type is not JSON or names a charset other than UTF-8 (415), when it is compressed (415:
    `codings` holds every Content-Encoding line's value), or when its declared length is
    over `limit` (413); and while reading, as soon as it grows past `limit`."""
    if content_types:
        if len(content_types) > 1:
            raise repeated_content_type(len(content_types))
        _check_type(content_types[0], patch)
    if codings:
        _check_codings(codings, patch)
    if declared.isascii() and declared.isdigit() and _over(declared, limit):
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def repeated_content_type(lines: int) -> Problem:
    """The 400 for a body sent with several Content-Type lines, whatever they hold: which
    of them says what the body is? (RFC 9110 5.3: Content-Type is not a list.)"""
    return Problem(
        400,
        f"more than one Content-Type header ({lines}); send one, 'Content-Type: application/json'",
        slug="invalid-request",
        title="Bad Request",
    )


def _check_type(content_type: str, patch: bool) -> None:
    media, _, parameters = content_type.partition(";")
    media = media.strip().lower()
    if media != JSON and JSON_SUFFIXED.fullmatch(media) is None:
        raise Problem(
            415,
            f"the body must be JSON, sent with 'Content-Type: application/json' "
            f"(got {media or 'an empty type'!r}); with curl, add "
            f"-H 'Content-Type: application/json'",
            headers=_accept_patch(patch),
        )
    if parameters and (charset := _other_charset(parameters)) is not None:
        raise Problem(
            415,
            f"only UTF-8 is accepted (JSON is UTF-8, RFC 8259), not charset "
            f"{shown(charset)!r}; send the body in UTF-8 with 'Content-Type: application/json'",
            headers=_accept_patch(patch),
        )


def _check_codings(codings: list[str], patch: bool) -> None:
    """A body is read as it comes: none of its Content-Encoding lines may name a coding
    other than `identity` (a gzipped body was read as JSON, and refused as invalid UTF-8).
    RFC 9110 15.5.16: a 415 for a content coding, with the codings accepted."""
    for line in codings:
        for coding in line.split(","):
            coding = coding.strip().lower()
            if coding and coding != "identity":
                raise Problem(
                    415,
                    f"the body must be sent uncompressed: Content-Encoding {shown(coding)!r} "
                    f"is not accepted; send it without a Content-Encoding header",
                    headers={"Accept-Encoding": "identity", **_accept_patch(patch)},
                )


def _accept_patch(patch: bool) -> dict[str, str]:
    return {"Accept-Patch": JSON} if patch else {}


def _other_charset(parameters: str) -> str | None:
    """The first `charset` among a Content-Type's `parameters` that is not UTF-8 (its
    value unquoted), or None. JSON is UTF-8 (RFC 8259, 8.1): a body declared in another
    charset would be read as UTF-8 all the same, and mean something else."""
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            if value.lower() != "utf-8":
                return value
    return None


def _over(digits: str, limit: int) -> bool:
    """Whether the decimal `digits` are a number over `limit`, however many there are
    (int() refuses a string of over 4,300 digits)."""
    digits = digits.lstrip("0")
    return len(digits) > len(str(limit)) or int(digits or "0") > limit


def too_large(limit: int) -> Problem:
    return Problem(413, f"the body is larger than the limit of {limit} bytes (MAX_BODY_BYTES)")


def shown(text: str, limit: int = 64) -> str:
    """`text` as a problem document names it: cut to `limit` characters (a client's
    60 KB parameter name is not echoed back whole)."""
    return text if len(text) <= limit else text[:limit] + "…"


def no_query(query_string: bytes) -> None:
    """For an operation that takes no query parameter: a 422 naming the first one given."""
    if query_string:
        for name in QueryParams(query_string):
            raise invalid(
                f"/query/{shown(name)}", "is not a known parameter (this operation takes none)"
            )


def consume_wait(params: QueryParams) -> float:
    """`?wait=N`: seconds (0 to 20, decimals allowed) to wait for a workflow to arrive."""
    for name in params:
        if name != "wait":
            raise invalid(f"/query/{shown(name)}", "is not a known parameter (wait)")
        if len(params.getlist(name)) > 1:
            raise invalid("/query/wait", "is given more than once")
    raw = params.get("wait")
    if raw is None:
        return 0.0
    plain_decimal = raw.isascii() and raw.replace(".", "", 1).isdigit()
    # Compared exactly: as a float, 20.000000000000001 is 20.
    if not plain_decimal or Decimal(raw) > MAX_WAIT_SECONDS:
        raise invalid("/query/wait", f"must be a number of seconds from 0 to {MAX_WAIT_SECONDS}")
    return float(raw)


def list_query(params: QueryParams) -> tuple[WorkflowStatus | None, UUID | None, int, bool | None]:
    """GET /workflow's query: status, after, limit (1-1000, default 100), dead_lettered."""
    for name in params:
        if name not in LIST_PARAMETERS:
            raise invalid(
                f"/query/{shown(name)}",
                "is not a known parameter (status, limit, after, dead_lettered)",
            )
        if len(params.getlist(name)) > 1:
            raise invalid(f"/query/{shown(name)}", "is given more than once")
    status = None
    if "status" in params:
        try:
            status = WorkflowStatus(params["status"])
        except ValueError:
            raise invalid("/query/status", f"must be one of {schemas.STATUSES}") from None
    limit = 100
    if "limit" in params:
        raw = params["limit"]
        digits = raw.lstrip("0")  # int() refuses over 4,300 digits: a 500, not a 422
        if not (raw.isascii() and raw.isdigit() and len(digits) <= 4):
            raise invalid("/query/limit", "must be an integer from 1 to 1000")
        limit = int(digits or "0")
        if not 1 <= limit <= 1000:
            raise invalid("/query/limit", "must be an integer from 1 to 1000")
    after = schemas.parse_uuid(params["after"], "/query/after") if "after" in params else None
    dead = None
    if "dead_lettered" in params:
        if params["dead_lettered"] not in ("true", "false"):
            raise invalid("/query/dead_lettered", "must be true or false")
        dead = params["dead_lettered"] == "true"
    return status, after, limit, dead


def next_page_link(
    path: str, status: WorkflowStatus | None, limit: int, dead: bool | None, last: UUID
) -> str:
    """The Link header of a list page that has a next one: the same query, after `last`."""
    query = {"limit": str(limit), "after": str(last)}
    if status is not None:
        query["status"] = status.value
    if dead is not None:
        query["dead_lettered"] = str(dead).lower()
    return f'<{path}?{urlencode(query)}>; rel="next"'
