"""infra/docker-entrypoint.sh hands any command the URLs and tokens from Docker secrets:
docs/deploy.md runs `docker-entrypoint.sh prune ...` in an API container for that."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ENTRYPOINT = Path(__file__).resolve().parents[2] / "infra" / "docker-entrypoint.sh"


def run(tmp_path: Path, env: dict[str, str], *arguments: str) -> subprocess.CompletedProcess[str]:
    """The entrypoint under `sh`, with a `workflows` on PATH that prints what it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "workflows"
    fake.write_text(
        '#!/bin/sh\nprintf "%s|%s|%s|%s\\n" "$*" "${DATABASE_URL:-}" "${API_TOKENS:-}" '
        '"${DATABASE_URL_FILE:-unset}"\n'
    )
    fake.chmod(0o755)
    base = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *arguments],
        env=base | env,
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    )


def test_a_command_gets_the_database_url_and_tokens_from_their_secret_files(
    tmp_path: Path,
) -> None:
    (tmp_path / "url").write_text("postgresql://app:s3cret@db/workflows\n")
    (tmp_path / "tokens").write_text("token-0123456789abcdef\n")
    env = {
        "DATABASE_URL_FILE": str(tmp_path / "url"),
        "API_TOKENS_FILE": str(tmp_path / "tokens"),
        "DATABASE_URL": "postgresql://ignored@elsewhere/x",
    }
    done = run(tmp_path, env, "prune", "--workflows-older-than", "30d")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "prune --workflows-older-than 30d|postgresql://app:s3cret@db/workflows"
        "|token-0123456789abcdef|unset\n"
    )


def test_without_a_secret_a_command_keeps_the_environment_it_was_given(tmp_path: Path) -> None:
    done = run(tmp_path, {"DATABASE_URL": "postgresql://plain@db/w"}, "stats")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "stats|postgresql://plain@db/w||unset\n"


def test_a_secret_file_that_cannot_be_read_stops_it(tmp_path: Path) -> None:
    done = run(tmp_path, {"DATABASE_URL_FILE": str(tmp_path / "missing")}, "prune")
    assert done.returncode == 1
    assert "DATABASE_URL_FILE=" in done.stderr
    assert "is not a readable file" in done.stderr
    assert done.stdout == ""
