"""docs/deploy.md's table of timeouts says what the code does: each row's seconds are the
value of the constant it names."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"
ROW = re.compile(r"^\| (?P<what>[^|]+) \| (?P<seconds>[\d.]+) \| `(?P<where>[\w.]+)` \| [^|]+ \|$")


def timeout_rows() -> list[tuple[str, float, str]]:
    text = DEPLOY.read_text()
    section = text.split("## Timeouts", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if match := ROW.match(line):
            rows.append((match["what"], float(match["seconds"]), match["where"]))
    return rows


def test_every_timeout_in_the_deploy_doc_is_the_codes() -> None:
    rows = timeout_rows()
    assert len(rows) >= 10, "the table of timeouts is gone or no longer parses"
    wrong = []
    for what, seconds, where in rows:
        module, _, name = where.rpartition(".")
        value = getattr(importlib.import_module(f"workflows.{module}"), name)
        if float(value) != seconds:
            wrong.append(f"{what}: the doc says {seconds:g} s, {where} is {value}")
    assert not wrong, wrong
