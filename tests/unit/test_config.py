from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from workflows.adapters.csv_export import MARKER
from workflows.adapters.postgres.database import session_options
from workflows.domain.ids import uuid7
from workflows.domain.model import JsonDocument, Workflow
from workflows.entrypoints.config import DEFAULTS, ConfigError, Settings
from workflows.entrypoints.container import Container


def test_defaults_apply_when_nothing_is_set() -> None:
    settings = Settings.from_env({})
    assert (settings.host, settings.port) == ("127.0.0.1", 5000)
    assert settings.queue_backend == "postgres"
    assert settings.database_url is None
    assert settings.export_dir == Path("var/exports")
    assert settings.max_body_bytes == 1024 * 1024
    assert settings.list_page_bytes == 8 * 1024 * 1024
    assert Settings.from_env({"LIST_PAGE_BYTES": "1"}).list_page_bytes == 1
    assert settings.export_flush_interval == 1.0
    assert settings.rabbitmq_prefetch == 32
    assert settings.loop_stall_seconds == 1.0
    assert Settings.from_env({"LOOP_STALL_SECONDS": "0"}).loop_stall_seconds == 0.0  # off


def test_rabbitmq_is_the_default_backend_when_its_url_is_set() -> None:
    settings = Settings.from_env({"RABBITMQ_URL": "amqp://guest:guest@127.0.0.1:5672/%2F"})
    assert settings.queue_backend == "rabbitmq"


def test_prefetch_zero_turns_the_prefetching_consumer_off() -> None:
    env = {"RABBITMQ_URL": "amqp://x", "RABBITMQ_PREFETCH": "0"}
    assert Settings.from_env(env).rabbitmq_prefetch == 0


def test_explicit_backend_wins() -> None:
    env = {"RABBITMQ_URL": "amqp://x", "QUEUE_BACKEND": "postgres", "PORT": "8080"}
    settings = Settings.from_env(env)
    assert (settings.queue_backend, settings.port) == ("postgres", 8080)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"QUEUE_BACKEND": "kafka"}, "QUEUE_BACKEND"),
        ({"QUEUE_BACKEND": "rabbitmq"}, "RABBITMQ_URL"),
        ({"PORT": "http"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"MAX_BODY_BYTES": "0"}, "MAX_BODY_BYTES"),
        ({"LIST_PAGE_BYTES": "0"}, "LIST_PAGE_BYTES"),
        ({"LIST_PAGE_BYTES": "8M"}, "LIST_PAGE_BYTES"),
        ({"CONFIRM_TIMEOUT": "-1"}, "CONFIRM_TIMEOUT"),
        ({"EXPORT_FLUSH_INTERVAL": "-1"}, "EXPORT_FLUSH_INTERVAL"),
        ({"EXPORT_FLUSH_INTERVAL": "soon"}, "EXPORT_FLUSH_INTERVAL"),
        ({"EXPORT_FLUSH_INTERVAL": "inf"}, "EXPORT_FLUSH_INTERVAL"),
        ({"EXPORT_FLUSH_INTERVAL": "3601"}, "EXPORT_FLUSH_INTERVAL"),
        ({"RABBITMQ_PREFETCH": "-1"}, "RABBITMQ_PREFETCH"),
        ({"LOOP_STALL_SECONDS": "-1"}, "LOOP_STALL_SECONDS must not be negative"),
        ({"LOOP_STALL_SECONDS": "nan"}, "LOOP_STALL_SECONDS"),
        ({"LOOP_STALL_SECONDS": "3601"}, "LOOP_STALL_SECONDS must be at most 3600"),
        ({"LOOP_STALL_SECONDS": "0.05"}, "LOOP_STALL_SECONDS must be 0 or at least 0.1"),
        ({"EXPORT_FLUSH_INTERVAL": "1e-300"}, "EXPORT_FLUSH_INTERVAL must be 0 or at least"),
        ({"RABBITMQ_PREFETCH": "many"}, "RABBITMQ_PREFETCH"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR"),
        ({"LOG_LEVEL": "warn"}, "LOG_LEVEL"),  # uvicorn would fail on it later
        ({"RABBITMQ_URL": "garbage"}, "RABBITMQ_URL is not an AMQP URL"),
        ({"RABBITMQ_URL": "amqp://h:5672/%2F?heartbeat=abc"}, "RABBITMQ_URL.*heartbeat"),
        ({"RABBITMQ_URL": "http://h/"}, "RABBITMQ_URL"),
        ({"RABBITMQ_URL": "amqp://user@h/"}, "RABBITMQ_URL.*a user without a password"),
        ({"DATABASE_URL": "garbage"}, "DATABASE_URL is not a PostgreSQL URL"),
        ({"DATABASE_URL": "postgresql://u:secret@h/db?nonsense=1"}, r"DATABASE_URL(?!.*secret)"),
        ({"IDEMPOTENCY_TTL": "1e12"}, "IDEMPOTENCY_TTL must be at most 315360000"),
        ({"IDEMPOTENCY_TTL": "inf"}, "IDEMPOTENCY_TTL"),
        ({"CONFIRM_TIMEOUT": "inf"}, "CONFIRM_TIMEOUT must be at most 60"),
        ({"HOST": "999.1.1.1"}, "HOST must be an IP address or a host name, not '999.1.1.1'"),
        ({"HOST": "1.2.3"}, "HOST"),
        ({"HOST": "api host"}, "HOST"),
        ({"HOST": "-api.example"}, "HOST"),
        ({"HOST": "http://api.example"}, "HOST"),
        ({"HOST": "a" * 64}, "HOST"),
        ({"PORT": "\uff11\uff12"}, "PORT must be an integer"),  # fullwidth digits
        ({"PORT": "1_000"}, "PORT must be an integer"),
        ({"DB_POOL_SIZE": "9" * 5000}, "DB_POOL_SIZE must be an integer"),
        ({"RABBITMQ_QUEUE": "amq.work"}, "RABBITMQ_QUEUE must not start with 'amq.'"),
        ({"RABBITMQ_QUEUE": "q" * 251}, "RABBITMQ_QUEUE must be at most 250 bytes"),
    ],
)
def test_bad_settings_are_refused_with_their_name(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("postgresql://u@h/db", "-c TimeZone=UTC -c lock_timeout=5000"),
        (
            "postgresql://u@h/db?options=-c%20search_path%3Dq",
            "-c search_path=q -c TimeZone=UTC -c lock_timeout=5000",
        ),
        (
            "host=h options='-c timezone=Europe/Oslo -c lock_timeout=0'",
            "-c timezone=Europe/Oslo -c lock_timeout=0",
        ),
    ],
)
def test_database_sessions_use_utc_and_a_lock_timeout_unless_the_url_sets_its_own(
    url: str, options: str
) -> None:
    assert session_options(url) == options


@pytest.mark.parametrize(
    ("interval", "flushed_behind", "every"),
    [("0", False, 1.0), ("0.5", True, 0.5), ("", True, 1.0)],
)
async def test_export_flush_interval_zero_fsyncs_each_file_instead(
    tmp_path: Path, interval: str, flushed_behind: bool, every: float
) -> None:
    env = {
        "QUEUE_BACKEND": "memory",
        "EXPORT_DIR": str(tmp_path),
        "EXPORT_FLUSH_INTERVAL": interval,
    }
    container = Container(settings=Settings.from_env(env))
    item = Workflow.new(uuid7(), JsonDocument("{}"), (), datetime.now(UTC))
    await container.exporter().write(item, b"\r\n\r\n", item.updated_at)
    assert (tmp_path / f"{item.uuid}.csv").read_bytes() == b"\r\n\r\n"
    # Only a file left to the flusher needs the flush record first.
    assert (tmp_path / MARKER).exists() is flushed_behind
    assert container.export_flusher().interval == every  # 0: the recovery's retries only


def test_the_longest_settings_still_serve() -> None:
    """At their limits: a key expiring ten years on is a date that can be stored."""
    settings = Settings.from_env(
        {"IDEMPOTENCY_TTL": "315360000", "CONFIRM_TIMEOUT": "60", "LOG_LEVEL": " debug "}
    )
    assert (settings.idempotency_ttl, settings.confirm_timeout) == (315360000, 60)
    assert settings.log_level == "DEBUG"


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "127.0.0.1", "::", "[::1]", "fe80::1", "localhost", "api", "db-1.example."]
)
def test_addresses_and_host_names_are_accepted(host: str) -> None:
    expected = host.strip("[]")  # what the server binds: uvicorn cannot resolve "[::1]"
    assert Settings.from_env({"HOST": host}).host == expected


def test_a_blank_variable_means_its_default() -> None:
    """Empty or only whitespace: a DATABASE_URL of " " connected to libpq's default
    database, and an empty RABBITMQ_QUEUE named the queue ''."""
    blank = dict.fromkeys(
        (
            "DATABASE_URL",
            "RABBITMQ_URL",
            "QUEUE_BACKEND",
            "RABBITMQ_QUEUE",
            "EMBEDDED_PG_DIR",
            "WORKFLOWS_COMMIT",
            "PORT",
            "DB_POOL_SIZE",
            "CONFIRM_TIMEOUT",
        ),
        " ",
    )
    for env in (blank, dict.fromkeys(blank, "")):
        assert Settings.from_env(env) == DEFAULTS


def test_an_empty_host_or_export_dir_means_the_default() -> None:
    settings = Settings.from_env({"HOST": " ", "EXPORT_DIR": ""})
    assert (settings.host, settings.export_dir) == (DEFAULTS.host, DEFAULTS.export_dir)
