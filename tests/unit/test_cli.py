"""The command line without the optional embedded PostgreSQL."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from workflows.entrypoints import cli


@pytest.mark.parametrize("command", ["migrate", "stats", "relay", "serve"])
def test_without_database_url_or_the_embedded_extra_a_command_says_what_to_do(
    command: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("QUEUE_BACKEND", "rabbitmq" if command == "relay" else "postgres")
    monkeypatch.setenv("RABBITMQ_URL", "amqp://unused:unused@127.0.0.1:1/%2F")  # never reached
    for module in ("pgserver", "pgserver.postgres_server"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed: ImportError
    assert cli.main([command]) == 2
    error = capsys.readouterr().err
    assert "DATABASE_URL is not set and the embedded PostgreSQL is not installed" in error
    assert "pip install 'workflows[embedded]'" in error
    assert not (tmp_path / "var").exists(), "nothing is made for a server that cannot start"


def test_serve_refuses_workers_that_would_split_the_memory_backend(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("QUEUE_BACKEND", "memory")
    assert cli.main(["serve", "--workers", "2", "--port", "1"]) == 2
    assert "QUEUE_BACKEND=memory keeps every workflow in one process" in capsys.readouterr().err
    assert cli.main(["serve", "--workers", "0", "--port", "1"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err


def test_serve_refuses_a_host_that_is_neither_an_address_nor_a_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("QUEUE_BACKEND", "memory")
    assert cli.main(["serve", "--host", "999.1.1.1", "--port", "1"]) == 2
    error = capsys.readouterr().err
    assert error == (
        "workflows: configuration error: --host must be an IP address or a host name, "
        "not '999.1.1.1'\n"
    )
    monkeypatch.setenv("HOST", "999.1.1.1")
    assert cli.main(["serve", "--port", "1"]) == 2
    assert "configuration error: HOST must be an IP address" in capsys.readouterr().err


def test_an_unreachable_database_is_one_line_and_status_1(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("QUEUE_BACKEND", "postgres")
    url = "postgresql://postgres:pw@127.0.0.1:1/nowhere?connect_timeout=2"
    monkeypatch.setenv("DATABASE_URL", url)
    for command in (["migrate"], ["stats"], ["serve"], ["prune", "--workflows-older-than", "9d"]):
        assert cli.main(command) == 1, command
        error = capsys.readouterr().err
        assert error.startswith("workflows: database is unavailable"), error
        assert error.count("\n") == 1
        assert "Traceback" not in error
        assert ":pw@" not in error


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--port", "70000"], "--port: must be a port number from 0 to 65535"),
        (["--port", "-1"], "--port: must be a port number"),
        (["--graceful-timeout", "nan"], "--graceful-timeout: must be a number of seconds"),
        (["--graceful-timeout", "-1"], "--graceful-timeout: must be a number of seconds"),
        (["--graceful-timeout", "inf"], "--graceful-timeout: must be a number of seconds"),
    ],
)
def test_serve_refuses_a_port_or_timeout_out_of_range(
    arguments: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--port 70860 bound 5324 (uvicorn took it modulo 65536) and --graceful-timeout nan
    ended the shutdown in a traceback."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUEUE_BACKEND", "memory")
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", *arguments])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_a_metrics_directory_that_cannot_be_made_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUEUE_BACKEND", "memory")
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "file"))
    assert cli.main(["serve", "--port", "1"]) == 2
    one_line(capsys, "workflows: configuration error: PROMETHEUS_MULTIPROC_DIR must be")


def test_an_unreadable_env_file_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_bytes(b"\xff\xfeLOG_LEVEL=INFO\n")
    assert cli.main(["stats"]) == 2
    one_line(capsys, "workflows: configuration error: .env cannot be read")


def test_an_empty_commit_is_the_checkouts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUEUE_BACKEND", "memory")
    monkeypatch.setenv("WORKFLOWS_COMMIT", "")
    cli.main(["stats"])  # (refused for memory: 2; the commit is settled before)
    assert os.environ["WORKFLOWS_COMMIT"] == cli._git_commit() != ""


def test_the_relay_with_an_unreachable_database_is_one_line_and_status_1(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It ran for ever, logging the pool's retries; then it logged six of the pool's
    WARNINGs on stdout before its line (`stats`, `prune`, `migrate` said nothing more)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres:pw@127.0.0.1:1/x?connect_timeout=1")
    monkeypatch.setenv("RABBITMQ_URL", "amqp://unused:unused@127.0.0.1:1/%2F")
    monkeypatch.setenv("LOG_FORMAT", "text")
    assert cli.main(["relay"]) == 1
    said = capsys.readouterr()
    assert "psycopg.pool" not in said.out, said.out
    assert said.err.startswith("workflows: database is unavailable"), said.err
    assert said.err.count("\n") == 1


def one_line(capsys: pytest.CaptureFixture[str], start: str) -> None:
    error = capsys.readouterr().err
    assert error.startswith(start), error
    assert error.count("\n") == 1
