"""CSV rendering: one row per object, nested objects flattened to dotted column names.

docs/csv.md describes the format for users, with examples. Where the contract is silent:

- Numbers are copied from the document's text: the characters of each JSON number
  token (`2.50`, `1E+400`, `-0`, a 5000-digit integer), never reformatted. Parsing keeps
  the tokens as text (`parse_int`/`parse_float`) rather than building Decimals to print
  again: the text cannot drift from the stored document, which the API returns as is.
- Arrays, and empty objects, are one cell of compact JSON: numbers as in the text, strings as
  UTF-8 with only the escapes JSON requires (`json.dumps(ensure_ascii=False)`).
- An empty object at the top gives a row with no cells: an empty header line and an
  empty line (`\\r\\n\\r\\n`). An empty array gives the empty header line alone. A row
  whose only cell is empty is written `""`, so it never reads as a blank line.
- When the first column name starts with U+FEFF, every header name is quoted, so the
  file never starts with the bytes of a byte order mark.
- Strings, header names included, that start with `=`, `+`, `-`, `@`, TAB or CR get a
  `'` in front. Numbers, booleans and JSON cells never do.
- Column names are unique in the written header: the name of a path is its keys joined
  with `.`, neutralised as above; a name already taken gets `~2`, or the first unused
  `~N`. Duplicate keys in one object (intake refuses them): the last value wins.
- Intake also refuses lone surrogates; should one get here, it becomes U+FFFD, as UTF-8
  cannot hold it. A document that is not an object or an array of objects, or that
  holds `NaN` or `Infinity`, raises ValueError.
- A CSV has a cell for every column in every row, so rows that each bring keys of their own
  make it quadratic: 81,500 objects of one distinct key each, 1 MiB of JSON, would be
  6.6 billion cells, gigabytes of commas. A document whose CSV would have more than
  MAX_CSV_CELLS cells (rows, the header included, times columns), or a header of more
  than MAX_CSV_HEADER_BYTES, raises CsvTooLarge before any line is written; intake
  refuses such data (`csv_cells`), so only a workflow stored before that check can meet
  it.
"""

from __future__ import annotations

import json
import re
from typing import Any, NoReturn

import orjson

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
MAX_CSV_CELLS = 10_000_000
"""Cells (rows, the header included, times columns) a CSV export may have: at least 10 MB
of separators, about a second of rendering. A dense document of MAX_BODY_BYTES (1 MiB)
has a few hundred thousand; only rows with keys of their own come near it."""
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_json_string = json.JSONEncoder(ensure_ascii=False).encode


MAX_CSV_HEADER_BYTES = 16 * 1024 * 1024
"""Bytes of column names a CSV export's header may have. A name is the path of keys to its
value, so one long key holding many others repeats in each of their names: 136 KB of JSON
(a key of 50,000 characters over 10,000 keys) made a 500 MB header, 2 GB of a worker's
memory to render, and 1 MiB would have made 30 GB; the cell count did not see it."""


class CsvTooLarge(ValueError):
    """The document's CSV would have more than MAX_CSV_CELLS cells, or a header of more
    than MAX_CSV_HEADER_BYTES."""

    def __init__(self, rows: int, columns: int, header_bytes: int = 0) -> None:
        if header_bytes > MAX_CSV_HEADER_BYTES:
            message = (
                f"its CSV export's header would have {header_bytes:,} bytes of column names"
                f" (the keys' paths): more than the {MAX_CSV_HEADER_BYTES:,} allowed"
            )
        else:
            message = (
                f"its CSV export would have {rows:,} rows (the header included) of {columns:,}"
                f" columns, {rows * columns:,} cells: more than the {MAX_CSV_CELLS:,} allowed"
            )
        super().__init__(message)
        self.rows = rows
        self.columns = columns


class _Raw(str):
    """JSON text to copy as it is: a number token as the document writes it, or punctuation."""


def _not_json(constant: str) -> NoReturn:
    raise ValueError(f"{constant} is not JSON")


def render_csv(text: str) -> bytes:
    """The CSV export of a JSON document's text (docs/csv.md); ValueError if it has none."""
    document = json.loads(text, parse_int=_Raw, parse_float=_Raw, parse_constant=_not_json)
    rows = document if isinstance(document, list) else [document]
    if not all(isinstance(row, dict) for row in rows):
        raise ValueError("a CSV export needs a JSON object or an array of objects")
    check_csv_cells(text, rows)  # before the names are built: a stored document too
    columns = _Columns()
    root = _Path("", "")
    flat_rows = [_flatten(row, root, columns) for row in rows]
    if (len(rows) + 1) * len(columns.names) > MAX_CSV_CELLS:
        raise CsvTooLarge(len(rows) + 1, len(columns.names))
    return _utf8(_csv_text(columns.names, flat_rows))


def check_csv_cells(text: bytes | str, rows: list[dict[str, Any]]) -> None:
    """Raise CsvTooLarge if the CSV of `rows` (parsed from `text`, the JSON they were read
    from, or a text holding it) would have more than MAX_CSV_CELLS cells.

    Cheap for nearly all documents: a row is an object and a column a key, each written
    with a `{` or a `:` in the text (one there may be in a string too), so when those
    bound the cells no key is walked. Likewise the header (MAX_CSV_HEADER_BYTES): a column's
    name is keys of the text joined by dots, at most 64 deep, so no longer than the text
    and 64 bytes."""
    if isinstance(text, bytes):
        colons, braces, longest = text.count(b":"), text.count(b"{"), len(text) + 64
    else:  # characters: up to 4 bytes each
        colons, braces, longest = text.count(":"), text.count("{"), 4 * len(text) + 64
    if (braces + 1) * colons <= MAX_CSV_CELLS and colons * longest <= MAX_CSV_HEADER_BYTES:
        return
    columns, header_bytes = _count_columns(rows)
    if (len(rows) + 1) * columns > MAX_CSV_CELLS or header_bytes > MAX_CSV_HEADER_BYTES:
        raise CsvTooLarge(len(rows) + 1, columns, header_bytes)


def _count_columns(rows: list[dict[str, Any]]) -> tuple[int, int]:
    """The CSV's columns: key paths that end at a value other than a non-empty object in
    some row (what `_flatten` gives a column), counted on a trie of the paths; and the
    UTF-8 bytes of their names (each path's keys and the dots between them)."""
    root: dict[str, list[Any]] = {}  # key: [children, has a column, name length]
    count = header = 0
    for row in rows:
        stack = [(root, iter(row.items()), -1)]
        while stack:
            node, items, prefix = stack[-1]
            for key, value in items:
                child = node.get(key)
                if child is None:
                    child = node[key] = [{}, False, prefix + 1 + len(key.encode())]
                if isinstance(value, dict) and value:
                    stack.append((child[0], iter(value.items()), child[2]))
                    break
                if not child[1]:
                    child[1] = True
                    count += 1
                    header += child[2]
            else:
                stack.pop()
    return count, header


def _csv_text(names: list[str], flat_rows: list[list[tuple[int, str]]]) -> str:
    if names and names[0].startswith("\ufeff"):
        # Quoted, so that the file never opens with what readers take for a byte order
        # mark (and strip).
        lines = [",".join(_quoted(name) for name in names) + "\r\n"]
    else:
        lines = [_line(names)]
    width = len(names)
    for cells in flat_rows:
        line = [""] * width
        for column, cell in cells:
            line[column] = cell
        lines.append(_line(line))
    return "".join(lines)


def _line(cells: list[str]) -> str:
    """One CSV line, `\r\n` included: a cell holding `,`, `"`, CR or LF is quoted, its
    quotes doubled; the others are written as they are. What `csv.writer` writes with a
    `\r\n` line terminator (QUOTE_MINIMAL), which checks every character of every cell
    with a function call of its own: 93,000 of the 870,000-930,000 user-space instructions
    of a consume of the benchmark's document (bench/instructions.py; bench/notes.md,
    session 32).
    tests/unit/test_csv_export.py holds the two to the same bytes."""
    if not _to_quote("".join(cells)):  # nearly every line: nothing to quote
        if len(cells) == 1 and not cells[0]:
            return '""\r\n'  # as csv.writer: a lone empty cell must not read as a blank line
        return ",".join(cells) + "\r\n"
    return ",".join([_quoted(cell) if _to_quote(cell) else cell for cell in cells]) + "\r\n"


def _to_quote(text: str) -> bool:
    # Four searches for one character each (memchr), not a regular expression's character
    # class, which tests every character in turn.
    return "," in text or '"' in text or "\n" in text or "\r" in text


def _quoted(cell: str) -> str:
    return '"' + cell.replace('"', '""') + '"'


class _Path:
    """A key path, in a trie of every path seen: finding a column costs O(1) per key."""

    __slots__ = ("_prefix", "children", "column", "name")

    def __init__(self, name: str, prefix: str) -> None:
        self.name = name
        self._prefix = prefix
        self.children: dict[str, _Path] = {}
        self.column: int | None = None

    def child(self, key: str) -> _Path:
        child = self.children.get(key)
        if child is None:
            name = self._prefix + key
            child = self.children[key] = _Path(name, name + ".")
        return child


class _Columns:
    """Header names in order of first appearance, each unique in the written header."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._taken: set[str] = set()
        self._next_suffix: dict[str, int] = {}

    def add(self, path_name: str) -> int:
        name = _neutralise(path_name)
        if name in self._taken:
            # Names are never released, so every suffix below the memo is still taken.
            suffix = self._next_suffix.get(name, 2)
            while f"{name}~{suffix}" in self._taken:
                suffix += 1
            self._next_suffix[name] = suffix + 1
            name = f"{name}~{suffix}"
        self._taken.add(name)
        self.names.append(name)
        return len(self.names) - 1


def _flatten(row: dict[str, Any], root: _Path, columns: _Columns) -> list[tuple[int, str]]:
    """The row's (column, cell) pairs, depth first in key order. A loop, not recursion,
    so any nesting the JSON parser accepted renders too."""
    cells: list[tuple[int, str]] = []
    stack = [(root, iter(row.items()))]
    while stack:
        path, items = stack[-1]
        for key, value in items:
            child = path.child(key)
            if isinstance(value, dict) and value:
                stack.append((child, iter(value.items())))
                break
            if child.column is None:
                child.column = columns.add(child.name)
            cells.append((child.column, _cell(value)))
        else:
            stack.pop()
    return cells


def _cell(value: object) -> str:
    if value is None:
        return ""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, _Raw):
        return value
    if isinstance(value, str):
        return _neutralise(value)
    return _compact_json(value)


def _neutralise(text: str) -> str:
    """Prefix `'` so that a spreadsheet shows the text rather than run it as a formula."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


_COMMA = _Raw(",")
_CLOSE_ARRAY = _Raw("]")
_CLOSE_OBJECT = _Raw("}")


def _compact_json(value: object) -> str:
    """A parsed array or object as compact JSON text, each number as its token.

    orjson writes it, each number a Fragment of its token (the same text, a tenth of the
    CPU: bench/notes.md); the work list below where orjson refuses: a lone surrogate,
    nesting deeper than its limit."""
    try:
        return orjson.dumps(value, default=_token, option=orjson.OPT_PASSTHROUGH_SUBCLASS).decode()
    except orjson.JSONEncodeError:
        return _compact_json_slowly(value)


def _token(value: object) -> orjson.Fragment:
    if isinstance(value, _Raw):
        return orjson.Fragment(str(value))  # an exact str: Fragment takes no subclass
    raise TypeError(f"not a parsed JSON value: {value!r}")


def _compact_json_slowly(value: object) -> str:
    """A parsed array or object as compact JSON text; a work list, not recursion."""
    parts: list[str] = []
    todo: list[object] = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, _Raw):
            parts.append(item)
        elif isinstance(item, str):
            parts.append(_json_string(item))
        elif item is None:
            parts.append("null")
        elif isinstance(item, bool):
            parts.append("true" if item else "false")
        elif isinstance(item, list):
            parts.append("[")
            todo.append(_CLOSE_ARRAY)
            for index, element in enumerate(reversed(item)):
                todo.extend((_COMMA, element) if index else (element,))
        elif isinstance(item, dict):
            parts.append("{")
            todo.append(_CLOSE_OBJECT)
            for index, (key, element) in enumerate(reversed(item.items())):
                member = (element, _Raw(_json_string(key) + ":"))
                todo.extend((_COMMA, *member) if index else member)
        else:
            raise TypeError(f"not a parsed JSON value: {item!r}")
    return "".join(parts)


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub("\ufffd", text).encode("utf-8")
