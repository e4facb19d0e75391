"""Logging: one JSON object per line for machines, plain lines for a terminal.

Every line written while a request is handled carries that request's id (a context
variable the request middleware sets). Passwords in URLs and bearer tokens are masked in
every message and traceback, whoever logged them.

Deliberately free of prometheus_client: the CLI imports this module before it sets
PROMETHEUS_MULTIPROC_DIR, which must happen before that library is first imported.
"""

from __future__ import annotations

import logging
import logging.config
import re
import sys
from collections.abc import Iterable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

SECRETS = (
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/?#@\s]*:)[^@\s]*@", re.IGNORECASE), r"\1***@"),
    (re.compile(r"(\bbearer\s+)[^\s,;\"']+", re.IGNORECASE), r"\1***"),
    (re.compile(r"(\bpassword\s*=\s*)[^\s&;]+", re.IGNORECASE), r"\1***"),
    # RFC 6750's query form: a client may send its token so, and the access log has the URL.
    (re.compile(r"(\baccess_token=)[^\s&;#\"']+", re.IGNORECASE), r"\1***"),
)
_LITERALS: list[str] = []  # the configured API tokens, wherever a client put them
_ENCODED: list[re.Pattern[str]] = []  # the same, as a client may percent-encode them


def mask_values(values: Iterable[str]) -> None:
    """Mask these exact values too in every line from now on (the API tokens: a client
    may send one in a path or a query, which the access log writes), percent-encoded
    too, wholly or in part (`+` as `%2B`, as client libraries send it in a query)."""
    _LITERALS[:] = sorted({value for value in values if value}, key=len, reverse=True)
    _ENCODED[:] = [re.compile("".join(map(_as_sent, value))) for value in _LITERALS]


def _as_sent(char: str) -> str:
    if not char.isascii():
        return re.escape(char)
    return f"(?:{re.escape(char)}|%(?i:{ord(char):02x}))"


def redact(text: str) -> str:
    """`text` with URL passwords, bearer tokens, `password=` and `access_token=` values,
    and the values given to `mask_values` masked."""
    for pattern, replacement in SECRETS:
        text = pattern.sub(replacement, text)
    for literal in _LITERALS:
        if literal in text:
            text = text.replace(literal, "***")
    if "%" in text:
        for encoded in _ENCODED:
            text = encoded.sub("***", text)
    return text


def printable(value: Any) -> Any:
    """`value` (a string, or a dict or list of them) with every unpaired UTF-16 surrogate
    written out as its escape, the six characters `\\udfff`: what UTF-8, and so orjson,
    can carry. A client may send one in a key (`"\\udfff"` in JSON), which a pointer or a
    log line then names."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {printable(key): printable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [printable(item) for item in value]
    return value


class RequestIdFilter(logging.Filter):
    """Adds `request_id` (None outside a request) to every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if (rid := getattr(record, "request_id", None)) is not None:
            entry["request_id"] = rid
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            client, method, path, _, status = args  # as uvicorn logs them
            entry |= {"client": client, "method": method, "path": redact(str(path))}
            entry["status"] = status
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exception"] = redact(record.exc_text)
        try:
            return orjson.dumps(entry).decode()
        except orjson.JSONEncodeError:  # an unpaired surrogate, from a request
            return orjson.dumps(printable(entry)).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s%(rid)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        record.rid = f" [{rid}]" if rid else ""
        line: str = printable(redact(super().format(record)))
        return line


def use_json(log_format: str, stream: Any = None) -> bool:
    """JSON unless told `text`, or told `auto` and writing to a terminal."""
    if log_format != "auto":
        return log_format == "json"
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return not (isatty is not None and isatty())


def logging_config(
    level: str, log_format: str = "auto", access_log: bool = False, stream: str = "stdout"
) -> dict[str, Any]:
    """A dictConfig for the root logger, uvicorn's loggers and pika, all to stdout (or to
    `stream`, "stderr": a command whose stdout is its answer, such as `stats --json`).

    Given to uvicorn as `log_config`, so its own lines (and every worker's) look the same.
    Without `access_log`, uvicorn's line per request is off (it costs throughput).
    """
    formatter = JsonFormatter if use_json(log_format, getattr(sys, stream)) else TextFormatter
    # pika writes seven ERROR lines for each failed connection attempt while the broker is
    # away; the adapter's own warning says it once, with the cause. Its lines at DEBUG only.
    pika_level = "DEBUG" if level == "DEBUG" else "CRITICAL"
    routed = {"handlers": [], "propagate": True}  # uvicorn's loggers, through root
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"default": {"()": formatter}},
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "stream": f"ext://sys.{stream}",
                "formatter": "default",
                "filters": ["request_id"],
            }
        },
        "root": {"level": level, "handlers": ["console"]},
        "loggers": {
            "uvicorn": {"level": level, **routed},
            "uvicorn.error": {"level": level, **routed},
            # Off, it has no handler anywhere: uvicorn then skips building the line at all
            # (it asks `hasHandlers()`), which a level alone would not spare it.
            "uvicorn.access": (
                {"level": level, **routed}
                if access_log
                else {"level": "WARNING", "handlers": [], "propagate": False}
            ),
            "pika": {"level": pika_level},
        },
    }


def configure_logging(
    level: str, log_format: str = "auto", access_log: bool = False, stream: str = "stdout"
) -> None:
    logging.config.dictConfig(logging_config(level, log_format, access_log, stream))
