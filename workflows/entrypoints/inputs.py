"""Request inputs read the same way by the Starlette handlers (http.py) and the hot
routes (hot.py): the JSON body, and the consume call's query."""

from __future__ import annotations

from starlette.datastructures import QueryParams
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from workflows.entrypoints.problems import Problem, invalid

JSON = "application/json"
MAX_WAIT_SECONDS = 20


async def receive_json_body(
    receive: Receive, content_type: str | None, declared: str, limit: int, *, patch: bool = False
) -> bytes:
    """Read a request body off `receive`: refused (415, 413) before reading when its
    declared type is not JSON or its declared length is over `limit`, and while reading
    as soon as it grows past `limit`."""
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        if media != JSON and not media.endswith("+json"):
            raise Problem(
                415,
                f"the body must be JSON, sent with 'Content-Type: application/json' "
                f"(got {media or 'an empty type'!r}); with curl, add "
                f"-H 'Content-Type: application/json'",
                headers={"Accept-Patch": JSON} if patch else {},
            )
    if declared.isdigit() and int(declared) > limit:
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


def too_large(limit: int) -> Problem:
    return Problem(413, f"the body is larger than the limit of {limit} bytes (MAX_BODY_BYTES)")


def consume_wait(params: QueryParams) -> float:
    """`?wait=N`: seconds (0 to 20, decimals allowed) to wait for a workflow to arrive."""
    for name in params:
        if name != "wait":
            raise invalid(f"/query/{name}", "is not a known parameter (wait)")
        if len(params.getlist(name)) > 1:
            raise invalid("/query/wait", "is given more than once")
    raw = params.get("wait")
    if raw is None:
        return 0.0
    plain_decimal = raw.isascii() and raw.replace(".", "", 1).isdigit()
    wait = float(raw) if plain_decimal else -1.0
    if not 0 <= wait <= MAX_WAIT_SECONDS:
        raise invalid("/query/wait", f"must be a number of seconds from 0 to {MAX_WAIT_SECONDS}")
    return wait
