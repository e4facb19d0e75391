"""JSON as clients send it: read from the body strictly (numbers kept as the text sent), and
checked to be storable (depth, NUL characters, unpaired surrogates, numbers PostgreSQL's
numeric holds)."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from simplejson import RawJSON

from workflows.entrypoints.problems import Problem, error, invalid

MAX_DEPTH = 64
MAX_PROBLEMS = 20
"""The errors a 422 lists at most: checking a document stops at this many."""
# PostgreSQL's numeric (which JSONB numbers are) holds these many digits at most.
MAX_INTEGER_DIGITS = 131072
MAX_FRACTION_DIGITS = 16383
# And it refuses a number whose written exponent is at least INT_MAX / 2 from zero before it
# looks at the digits: a zero's too (0e1073741823), while 0e1073741822 is stored as 0.
MAX_EXPONENT = 1073741822


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


def check_data(data: Any, problems: list[dict[str, str]]) -> None:
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
    if len(problems) >= MAX_PROBLEMS:
        return
    if depth > MAX_DEPTH:
        problems.append(error(pointer, f"nests deeper than {MAX_DEPTH} levels"))
    elif isinstance(value, dict):
        for key, item in value.items():
            child = f"{pointer}/{key.replace('~', '~0').replace('/', '~1')}"
            check_string(key, child, problems, what="key")
            _check_value(item, child, depth + 1, problems)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_value(item, f"{pointer}/{index}", depth + 1, problems)
    elif isinstance(value, str):
        check_string(value, pointer, problems)
    elif isinstance(value, RawJSON) and not _storable(value.encoded_json):
        problems.append(error(pointer, "number is too large or too precise to store"))


def _storable(text: str) -> bool:
    """Whether PostgreSQL's numeric holds the JSON number `text`."""
    _, e, written = text.lower().partition("e")
    # Checked before Decimal, which cannot read an exponent of 19 digits or more.
    if e and (
        len(digits := written.lstrip("+-").lstrip("0")) > 10 or int(digits or 0) > MAX_EXPONENT
    ):
        return False
    number = Decimal(text)
    # PostgreSQL stores a zero of any smaller positive exponent (0e999999) as 0.
    integer_digits = 0 if number.is_zero() else number.adjusted() + 1
    exponent = number.as_tuple().exponent
    fraction_digits = -exponent if isinstance(exponent, int) and exponent < 0 else 0
    return integer_digits <= MAX_INTEGER_DIGITS and fraction_digits <= MAX_FRACTION_DIGITS


def check_string(
    value: str, pointer: str, problems: list[dict[str, str]], what: str = "string"
) -> None:
    if "\x00" in value:
        problems.append(error(pointer, f"{what} contains a NUL character (\\u0000)"))
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        problems.append(error(pointer, f"{what} contains an unpaired UTF-16 surrogate"))


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
