"""The command line without the optional embedded PostgreSQL."""

from __future__ import annotations

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
    monkeypatch.setenv("RABBITMQ_URL", "amqp://unused@127.0.0.1:1/%2F")  # never reached
    for module in ("pgserver", "pgserver.postgres_server"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed: ImportError
    assert cli.main([command]) == 2
    error = capsys.readouterr().err
    assert "DATABASE_URL is not set and the embedded PostgreSQL is not installed" in error
    assert "pip install 'workflows[embedded]'" in error
    assert not (tmp_path / "var").exists(), "nothing is made for a server that cannot start"
