"""Settings from the environment (and `.env`), validated once at start-up."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import attrs

from workflows.application.use_cases import LIST_PAGE_BYTES
from workflows.entrypoints.logs import redact

BACKENDS = ("rabbitmq", "postgres", "memory")
LOG_FORMATS = ("auto", "json", "text")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MAX_CONFIRM_TIMEOUT = 60.0
"""Seconds: a POST waits this long for its confirm at most; with the broker away a longer
wait would hold every POST (the relay delivers later whatever the wait)."""
MAX_IDEMPOTENCY_TTL = 10 * 365 * 24 * 3600.0
"""Ten years: a key's expiry must be a date PostgreSQL and Python can hold."""
MAX_LOOP_STALL = 3600.0
"""Seconds: the longest LOOP_STALL_SECONDS (a stall that long is one to hear of)."""
MAX_AGE = timedelta(days=36_500)
"""The longest AGE (`workflows prune`, RETAIN_*): a time back from now that a datetime holds."""
AGE = re.compile(r"([0-9]+)([smhd])")
AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
TOKEN = re.compile(r"[A-Za-z0-9._~+/-]{16,}=*")
"""RFC 6750 b64token, at least 16 characters (`openssl rand -hex 32` makes a good one)."""


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names it."""


@attrs.frozen
class Settings:
    host: str = "127.0.0.1"
    port: int = 5000
    database_url: str | None = attrs.field(default=None, repr=False)  # may hold a password
    queue_backend: str = "postgres"
    rabbitmq_url: str | None = attrs.field(default=None, repr=False)
    rabbitmq_queue: str = "workflows"
    rabbitmq_prefetch: int = 32
    export_dir: Path = Path("var/exports")
    export_flush_interval: float = 1.0
    embedded_data_dir: Path = Path("var/postgres")
    max_body_bytes: int = 1024 * 1024
    list_page_bytes: int = LIST_PAGE_BYTES
    log_level: str = "INFO"
    confirm_timeout: float = 0.0
    pool_size: int = 10
    idempotency_ttl: float = 24 * 3600.0
    max_delivery_attempts: int = 5
    commit: str = "unknown"
    api_tokens: tuple[str, ...] = attrs.field(default=(), repr=False)
    allow_unauthenticated: bool = False
    metrics_public: bool = True
    cors_origins: tuple[str, ...] = ()
    log_format: str = "auto"
    loop_stall_seconds: float = 1.0
    retain_consumed: timedelta | None = None
    retain_exports: timedelta | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        d = DEFAULTS
        rabbitmq_url = _text(env, "RABBITMQ_URL")
        if rabbitmq_url is not None:
            _check_rabbitmq_url(rabbitmq_url)
        database_url = _text(env, "DATABASE_URL")
        if database_url is not None:
            _check_database_url(database_url)
        backend = _text(env, "QUEUE_BACKEND") or ("rabbitmq" if rabbitmq_url else "postgres")
        if backend not in BACKENDS:
            raise ConfigError(
                f"QUEUE_BACKEND must be one of {', '.join(BACKENDS)}, not {backend!r}"
            )
        if backend == "rabbitmq" and not rabbitmq_url:
            raise ConfigError("QUEUE_BACKEND=rabbitmq needs RABBITMQ_URL")
        return cls(
            host=check_host(env.get("HOST", "").strip() or d.host, "HOST"),
            port=_int(env, "PORT", d.port, low=0, high=65535),
            database_url=database_url,
            queue_backend=backend,
            rabbitmq_url=rabbitmq_url,
            rabbitmq_queue=_queue_name(env),
            rabbitmq_prefetch=_int(
                env, "RABBITMQ_PREFETCH", d.rabbitmq_prefetch, low=0, high=65535
            ),
            export_dir=Path(env.get("EXPORT_DIR", "").strip() or d.export_dir),
            export_flush_interval=_flush_interval(env),
            embedded_data_dir=Path(_text(env, "EMBEDDED_PG_DIR") or d.embedded_data_dir),
            max_body_bytes=_int(env, "MAX_BODY_BYTES", d.max_body_bytes, low=1),
            list_page_bytes=_int(env, "LIST_PAGE_BYTES", d.list_page_bytes, low=1),
            log_level=_log_level(env),
            confirm_timeout=_float(env, "CONFIRM_TIMEOUT", d.confirm_timeout, MAX_CONFIRM_TIMEOUT),
            pool_size=_int(env, "DB_POOL_SIZE", d.pool_size, low=1),
            idempotency_ttl=_float(env, "IDEMPOTENCY_TTL", d.idempotency_ttl, MAX_IDEMPOTENCY_TTL),
            max_delivery_attempts=_int(
                env, "MAX_DELIVERY_ATTEMPTS", d.max_delivery_attempts, low=1, high=1000
            ),
            commit=_text(env, "WORKFLOWS_COMMIT") or d.commit,
            api_tokens=_tokens(env),
            allow_unauthenticated=_bool(env, "ALLOW_UNAUTHENTICATED", False),
            metrics_public=_bool(env, "METRICS_PUBLIC", True),
            cors_origins=_origins(env),
            log_format=_log_format(env),
            loop_stall_seconds=_float(
                env, "LOOP_STALL_SECONDS", d.loop_stall_seconds, MAX_LOOP_STALL, low=0.1
            ),
            retain_consumed=_age(env, "RETAIN_CONSUMED"),
            retain_exports=_age(env, "RETAIN_EXPORTS"),
        )


def _text(env: Mapping[str, str], name: str) -> str | None:
    """The variable's value without surrounding whitespace; None when unset, empty or
    only whitespace (its default, then)."""
    return env.get(name, "").strip() or None


def _queue_name(env: Mapping[str, str]) -> str:
    name = _text(env, "RABBITMQ_QUEUE") or DEFAULTS.rabbitmq_queue
    # AMQP's limit is 255 bytes; the service also declares `{name}.dead`.
    if len(name.encode("utf-8")) > 250:
        raise ConfigError("RABBITMQ_QUEUE must be at most 250 bytes (AMQP's 255, less '.dead')")
    if name.startswith("amq."):
        raise ConfigError(f"RABBITMQ_QUEUE must not start with 'amq.' (RabbitMQ's own): {name!r}")
    return name


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int | None = None) -> int:
    raw = _text(env, name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.lstrip("+-").isdigit()):
        raise ConfigError(f"{name} must be an integer, not {raw!r}")
    try:
        value = int(raw)
    except ValueError:  # more digits than int() reads
        raise ConfigError(f"{name} must be an integer, not {raw[:20]!r}...") from None
    if value < low or (high is not None and value > high):
        raise ConfigError(f"{name}={value} is out of range")
    return value


def _float(
    env: Mapping[str, str], name: str, default: float, high: float, *, low: float = 0.0
) -> float:
    """Seconds from 0 to `high`; with `low`, 0 (which turns the thing off) or at least
    `low`: a loop that wakes every 1e-300 s spins a core."""
    raw = _text(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {raw!r}") from None
    if not value >= 0:
        raise ConfigError(f"{name} must not be negative")
    if value > high:  # inf too
        raise ConfigError(f"{name} must be at most {high:.0f} (seconds)")
    if 0 < value < low:
        raise ConfigError(f"{name} must be 0 or at least {low:g} (seconds)")
    return value


def parse_age(text: str) -> timedelta:
    """An age: a whole number and a unit (s, m, h or d), as 90s, 30m, 12h or 30d."""
    match = AGE.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"{text!r} is not an age: give a whole number and a unit, as 90s, 30m, 12h or 30d"
        )
    seconds = int(match[1]) * AGE_UNITS[match[2]]
    if seconds > MAX_AGE.total_seconds():
        raise ValueError(f"{text!r} is more than {MAX_AGE.days} days")
    return timedelta(seconds=seconds)


def age_text(value: timedelta) -> str:
    """`value` as an age in its largest whole unit (the inverse of `parse_age`)."""
    seconds = int(value.total_seconds())
    for unit in "dhm":
        if seconds and seconds % AGE_UNITS[unit] == 0:
            return f"{seconds // AGE_UNITS[unit]}{unit}"
    return f"{seconds}s"


def _age(env: Mapping[str, str], name: str) -> timedelta | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        return parse_age(raw)
    except ValueError as error:
        raise ConfigError(f"{name}: {error}") from None


def check_host(host: str, name: str) -> str:
    """`host` when it is an IP address (IPv6 may be bracketed: returned without the
    brackets) or a DNS name; a name of digits and dots only must be an IPv4 address
    (999.1.1.1 is neither)."""
    address = host.removeprefix("[").removesuffix("]") if host.startswith("[") else host
    try:
        ipaddress.ip_address(address)
        return address  # unbracketed: what the server binds to
    except ValueError:
        pass
    labels = host.removesuffix(".").split(".")
    numeric = all(label.isdigit() for label in labels)
    if numeric or len(host) > 253 or not all(HOST_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(f"{name} must be an IP address or a host name, not {host!r}")
    return host


def _flush_interval(env: Mapping[str, str]) -> float:
    # At most an hour: a flusher that never runs would leave every file unflushed.
    return _float(env, "EXPORT_FLUSH_INTERVAL", DEFAULTS.export_flush_interval, 3600, low=0.01)


def _log_level(env: Mapping[str, str]) -> str:
    value = env.get("LOG_LEVEL", DEFAULTS.log_level).strip().upper() or DEFAULTS.log_level
    if value not in LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, not {value!r}")
    return value


def _check_database_url(url: str) -> None:
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(url)
    except ProgrammingError as error:  # the message may quote the URL: masked
        raise ConfigError(
            f"DATABASE_URL is not a PostgreSQL URL or connection string "
            f"({redact(str(error).strip())})"
        ) from None


def _check_rabbitmq_url(url: str) -> None:
    import pika

    scheme = url.partition("://")[0].lower()
    try:
        if scheme not in ("amqp", "amqps"):
            raise ValueError("it must start with amqp:// or amqps://")
        parts = urlsplit(url)
        if parts.username is not None and parts.password is None:
            raise ValueError("it names a user without a password")  # which pika cannot take
        pika.URLParameters(url)
    except Exception as error:  # pika raises what its parsing meets (IndexError, ...)
        raise ConfigError(
            f"RABBITMQ_URL is not an AMQP URL like amqp://user:password@host:5672/%2F "
            f"({redact(str(error)) or type(error).__name__})"
        ) from None


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("true", "1", "yes"):
        return True
    if raw in ("false", "0", "no"):
        return False
    raise ConfigError(f"{name} must be true or false, not {raw!r}")


def _tokens(env: Mapping[str, str]) -> tuple[str, ...]:
    tokens = tuple(token.strip() for token in env.get("API_TOKENS", "").split(",") if token.strip())
    for position, token in enumerate(tokens, 1):
        if not TOKEN.fullmatch(token):  # the message never shows the token itself
            raise ConfigError(
                f"API_TOKENS: token {position} must be at least 16 characters of "
                f"A-Z a-z 0-9 - . _ ~ + / (e.g. from `openssl rand -hex 32`)"
            )
    return tokens


def _origins(env: Mapping[str, str]) -> tuple[str, ...]:
    origins = tuple(o.strip() for o in env.get("CORS_ORIGINS", "").split(",") if o.strip())
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ConfigError(
                f"CORS_ORIGINS: {origin!r} is not an origin like https://app.example.com or *"
            )
    return origins


def _log_format(env: Mapping[str, str]) -> str:
    value = env.get("LOG_FORMAT", "auto").strip().lower() or "auto"
    if value not in LOG_FORMATS:
        raise ConfigError(f"LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, not {value!r}")
    return value


DEFAULTS = Settings()
