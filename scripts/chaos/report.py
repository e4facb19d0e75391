"""The table: printed, and written into docs/chaos.md between the markers of its mode."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

COLUMNS = (
    # (heading, counter) — violations first after the volumes, then what is informational
    ("POST 201", "posted"),
    ("consumed 200", "consumed_ok"),
    ("missing", "missing"),
    ("dup rows", "duplicated"),
    ("consumed twice", "consumed_twice"),
    ("left inserted", "left_inserted"),
    ("dead-lettered", "dead_lettered"),
    ("outbox left", "outbox_left"),
    ("unaccounted", "unaccounted"),
    ("over-consumed", "over_consumed"),
    ("CSV mismatch", "csv_mismatch"),
    ("pruned unconsumed", "pruned_unconsumed"),
    ("lost resp. (accounted)", "lost_accounted"),
    ("5xx", "server_errors"),
    ("5xx after drain", "late_5xx"),
    ("conn errors", "transport_errors"),
    ("stored w/o 201", "stored_without_201"),
    ("POST retried (replayed)", "post_retries"),
)


@dataclass
class Row:
    scenario: str
    backend: str
    load_seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    fault: str = ""
    violations: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.violations

    @property
    def result(self) -> str:
        if self.error is not None:
            return "ERROR"
        if self.violations:
            return "FAIL " + ",".join(self.violations)
        return "ok"

    def cells(self) -> list[str]:
        values = [self.scenario, self.backend, f"{self.load_seconds:.0f}"]
        values += [self._cell(key) for _, key in COLUMNS]
        return [*values, self.fault, self.result]

    def _cell(self, key: str) -> str:
        if key not in self.counts:
            return "-"
        if key == "post_retries":
            return f"{self.counts[key]} ({self.counts.get('post_replayed', 0)})"
        return str(self.counts[key])


HEADINGS = ["scenario", "backend", "load s", *(h for h, _ in COLUMNS), "fault injected", "result"]


def text_table(rows: list[Row]) -> str:
    table = [HEADINGS, *(row.cells() for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADINGS))]
    texts = {0, 1, len(HEADINGS) - 2, len(HEADINGS) - 1}  # the others are numbers
    lines = [
        "  ".join(
            cell.ljust(w) if i in texts else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in table
    ]
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADINGS) + " |", "|" + "-|" * len(HEADINGS)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    def version(command: list[str]) -> str:
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
            return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "?"
        except (OSError, subprocess.TimeoutExpired):
            return "?"

    postgres = version(["psql", "-h", "127.0.0.1", "-U", "postgres", "-Atc", "SHOW server_version"])
    rabbit = version(["rabbitmqctl", "-q", "version"])
    return (
        f"{platform.node()}: {os.cpu_count()} cores, Linux {platform.release()}, "
        f"Python {platform.python_version()}, PostgreSQL {postgres.split()[0]}, RabbitMQ {rabbit}"
    )


def section(mode: str, rows: list[Row], wall: float, command: str, settings: str) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    verdict = "all scenarios passed" if all(r.ok for r in rows) else "VIOLATIONS FOUND"
    notes = [f"- {r.scenario}/{r.backend}: {note}" for r in rows for note in r.notes[:5]]
    errors = [f"- {r.scenario}/{r.backend}: {r.error}" for r in rows if r.error]
    parts = [
        f"Last `{command}`: {now}, on {machine()}; {settings}; "
        f"wall time {wall:.0f} s; **{verdict}**.",
        "",
        markdown_table(rows),
    ]
    if errors or notes:
        parts += ["", *errors, *notes]
    return "\n".join(parts)


def write_doc(path: Path, mode: str, body: str) -> None:
    begin, end = f"<!-- chaos:{mode}:begin -->", f"<!-- chaos:{mode}:end -->"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Chaos suite\n"
    block = f"{begin}\n{body}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + f"\n\n{block}\n"
    path.write_text(text, encoding="utf-8")
