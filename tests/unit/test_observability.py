"""/metrics, request ids, structured logs, and what the CLI offers to operate the service."""

from __future__ import annotations

import asyncio
import importlib
import io
import logging
import logging.config
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from dependency_injector import providers
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.routing import Route

from workflows.domain.errors import DependencyUnavailable
from workflows.entrypoints import cli, observability, operations
from workflows.entrypoints.config import Settings
from workflows.entrypoints.container import Container
from workflows.entrypoints.logs import (
    JsonFormatter,
    RequestIdFilter,
    TextFormatter,
    logging_config,
    mask_values,
    redact,
    use_json,
)
from workflows.entrypoints.observability import scrape_registry
from workflows.entrypoints.operations import Snapshot, metrics_directory

JSON = {"Content-Type": "application/json"}
BODY = b'{"data": {"a": 1}}'


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


async def test_requests_are_counted_by_route_template_not_by_path(
    client: httpx.AsyncClient,
) -> None:
    labels = {"method": "GET", "route": "/workflow/{uuid}", "status": "200"}
    before = sample("workflows_http_requests_total", **labels)
    uuids = []
    for _ in range(2):
        created = await client.post("/workflow", content=BODY, headers=JSON)
        uuids.append(created.json()["uuid"])
        assert (await client.get(f"/workflow/{uuids[-1]}")).status_code == 200
    assert sample("workflows_http_requests_total", **labels) == before + 2
    assert sample("workflows_http_request_duration_seconds_count", **labels) == before + 2
    page = (await client.get("/metrics")).text
    assert not any(uuid in page for uuid in uuids)


async def test_unknown_paths_and_methods_fall_into_bounded_labels(
    client: httpx.AsyncClient,
) -> None:
    unmatched = {"method": "GET", "route": "unmatched", "status": "404"}
    before = sample("workflows_http_requests_total", **unmatched)
    await client.get("/wp-admin/some-random-path-1")
    await client.get("/another/random/path-2")
    assert sample("workflows_http_requests_total", **unmatched) == before + 2
    other = {"method": "OTHER", "route": "/workflow", "status": "405"}
    before = sample("workflows_http_requests_total", **other)
    await client.request("BREW", "/workflow")
    assert sample("workflows_http_requests_total", **other) == before + 1
    assert "random" not in (await client.get("/metrics")).text


async def test_consume_outcomes_are_counted(
    client: httpx.AsyncClient, container: Container
) -> None:
    def outcome(name: str) -> float:
        return sample("workflows_consume_total", outcome=name)

    before = {name: outcome(name) for name in ("consumed", "empty", "error")}
    await client.post("/workflow", content=BODY, headers=JSON)
    assert (await client.post("/workflow/consume")).status_code == 200
    assert (await client.get("/v1/workflow/consume")).status_code == 204

    async def unavailable(*args: Any) -> None:
        raise DependencyUnavailable("queue", "down for the test")

    with container.consume_workflow.override(providers.Object(unavailable)):
        assert (await client.get("/workflow/consume")).status_code == 503
    assert (await client.get("/workflow/consume?bogus=1")).status_code == 422  # not counted
    after = {name: outcome(name) for name in before}
    assert after == {"consumed": before["consumed"] + 1, "empty": before["empty"] + 1,
                     "error": before["error"] + 1}  # fmt: skip


async def test_metrics_report_the_queue_depth(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(observability, "SNAPSHOT_TTL", 0.0)  # each scrape reads anew
    for _ in range(3):
        await client.post("/workflow", content=BODY, headers=JSON)
    samples = await scrape(client)
    assert samples[("workflows_queue_depth", (("backend", "memory"),))] == 3
    await client.get("/workflow/consume")
    samples = await scrape(client)
    assert samples[("workflows_queue_depth", (("backend", "memory"),))] == 2


async def test_scrapes_within_a_second_share_one_read_of_the_figures(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each read counts the queued rows: 16 clients scraping the public /metrics kept a
    PostgreSQL core busy at 300,000 queued (a cost audit)."""
    reads: list[object] = []
    real = operations.snapshot

    async def counted(container: object) -> Snapshot:
        reads.append(container)
        return await real(container)

    monkeypatch.setattr(observability, "snapshot", counted)
    monkeypatch.setattr(observability, "SNAPSHOT_TTL", 60.0)
    await asyncio.gather(*(scrape(client) for _ in range(8)))
    await scrape(client)
    assert len(reads) == 1
    monkeypatch.setattr(observability, "SNAPSHOT_TTL", 0.0)  # as once it is old enough
    await scrape(client)
    assert len(reads) == 2


def test_the_outbox_backlog_its_age_and_the_dead_letters_are_reported() -> None:
    from workflows.adapters.postgres.stats import OutboxBacklog

    snap = Snapshot("rabbitmq", queue_depth=5, outbox=OutboxBacklog(7, 12.5), dead_letters=2)
    page = scrape_registry(snap)
    assert page.get_sample_value("workflows_queue_depth", {"backend": "rabbitmq"}) == 5
    assert page.get_sample_value("workflows_dead_letters") == 2
    assert page.get_sample_value("workflows_outbox_backlog") == 7
    assert page.get_sample_value("workflows_outbox_oldest_age_seconds") == 12.5


def test_a_figure_that_cannot_be_read_is_left_out() -> None:
    page = scrape_registry(Snapshot("rabbitmq", queue_depth=None, outbox=None))
    assert page.get_sample_value("workflows_queue_depth", {"backend": "rabbitmq"}) is None
    assert page.get_sample_value("workflows_outbox_backlog") is None


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Log lines as the service writes them: JSON, with the request id filter."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    yield stream
    root.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


async def test_a_valid_request_id_is_echoed_and_logged(
    client: httpx.AsyncClient, container: Container, captured: io.StringIO
) -> None:
    async def unavailable(*args: Any) -> None:
        raise DependencyUnavailable("queue", "down for the test")

    with container.consume_workflow.override(providers.Object(unavailable)):
        response = await client.get("/workflow/consume", headers={"X-Request-ID": "req-42.a:b"})
    assert response.headers["x-request-id"] == "req-42.a:b"
    logged = [line for line in lines(captured) if "answering 503" in line["message"]]
    assert logged
    assert all(line["request_id"] == "req-42.a:b" for line in logged)


async def test_503s_in_a_row_log_one_line_not_one_each(
    client: httpx.AsyncClient, container: Container, captured: io.StringIO
) -> None:
    async def unavailable(*args: Any) -> None:
        raise DependencyUnavailable("database", "down for the test")

    with container.consume_workflow.override(providers.Object(unavailable)):
        for n in range(20):
            response = await client.get("/workflow/consume", headers={"X-Request-ID": f"r{n}"})
            assert response.status_code == 503
    logged = [line for line in lines(captured) if "answering 503" in line["message"]]
    assert [line["request_id"] for line in logged] == ["r0"]  # the next in 10 s, counted


@pytest.mark.parametrize("given", [None, "", "x" * 129, "has space", 'quote"d', "semi;colon"])
async def test_a_missing_or_unsafe_request_id_is_replaced(
    client: httpx.AsyncClient, given: str | None
) -> None:
    headers = {} if given is None else {"X-Request-ID": given}
    first = (await client.get("/healthz", headers=headers)).headers["x-request-id"]
    second = (await client.get("/healthz", headers=headers)).headers["x-request-id"]
    assert first != given
    assert first != second
    assert len(first) == 32
    assert int(first, 16) >= 0


async def test_an_unhandled_error_is_a_500_with_the_id_headers_and_log_line(
    container: Container, captured: io.StringIO
) -> None:
    from workflows.entrypoints.http import create_app

    async def boom(request: Request) -> None:
        raise RuntimeError("boom")

    app = create_app(container)
    app.router.routes.append(Route("/boom", boom))
    labels = {"method": "GET", "route": "/boom", "status": "500"}
    before = sample("workflows_http_requests_total", **labels)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/boom", headers={"X-Request-ID": "boom-1"})
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["x-request-id"] == "boom-1"
    assert response.headers["x-content-type-options"] == "nosniff"
    (logged,) = [line for line in lines(captured) if line.get("exception")]
    assert logged["request_id"] == "boom-1"
    assert "RuntimeError: boom" in logged["exception"]
    assert sample("workflows_http_requests_total", **labels) == before + 1


@pytest.mark.parametrize(
    ("method", "path", "hot_routes"),
    [
        ("POST", "/workflow", True),
        ("POST", "/v1/workflow", False),
        ("PATCH", "/workflow/0190b6d4-0000-7000-8000-000000000000", True),
    ],
)
async def test_a_body_cut_short_is_an_info_line_not_an_error_nor_an_answer(
    container: Container,
    captured: io.StringIO,
    caplog: pytest.LogCaptureFixture,
    method: str,
    path: str,
    hot_routes: bool,
) -> None:
    """The client went away mid-body, or its body was late and the server answered 408
    itself (http_protocol.py): the app's receive says http.disconnect. It logged an
    unhandled error with its traceback and counted a 500 nobody received."""
    from workflows.entrypoints.http import create_app

    app = create_app(container, hot_routes=hot_routes)
    messages: list[MutableMapping[str, Any]] = [
        {"type": "http.request", "body": b'{"data": ', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return messages.pop(0)

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"x-request-id", b"cut-1")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }
    caplog.set_level(logging.INFO, logger="workflows")
    counted = answered()
    await app(scope, receive, send)
    assert sent == []
    (logged,) = lines(captured)
    assert logged["level"] == "INFO"
    assert logged["request_id"] == "cut-1"
    assert logged["message"].startswith(f"{method} {path}: the request's body did not all arrive")
    assert answered() == counted


def answered() -> float:
    """Every request counted in workflows_http_requests_total, whatever its labels."""
    samples = (sample for family in REGISTRY.collect() for sample in family.samples)
    return sum(s.value for s in samples if s.name == "workflows_http_requests_total")


def test_a_json_log_line_is_one_object_with_its_fields() -> None:
    record = logging.LogRecord("workflows.x", logging.WARNING, __file__, 1, "n=%d", (3,), None)
    record.request_id = "r-1"
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = orjson.loads(line)
    assert entry["message"] == "n=3"
    assert (entry["level"], entry["logger"], entry["request_id"]) == (
        "WARNING",
        "workflows.x",
        "r-1",
    )
    assert entry["time"].endswith("+00:00")


def test_an_access_log_line_has_the_request_fields() -> None:
    args = ("127.0.0.1:5", "GET", "/workflow?limit=1", "1.1", 200)
    record = logging.LogRecord(
        "uvicorn.access", 20, __file__, 1, '%s - "%s %s HTTP/%s" %d', args, None
    )
    entry = orjson.loads(JsonFormatter().format(record))
    assert entry["message"] == '127.0.0.1:5 - "GET /workflow?limit=1 HTTP/1.1" 200'
    assert (entry["method"], entry["path"], entry["status"]) == ("GET", "/workflow?limit=1", 200)


def test_a_text_log_line_names_the_request() -> None:
    record = logging.LogRecord("workflows.x", logging.INFO, __file__, 1, "hello", (), None)
    record.request_id = "r-2"
    assert "[r-2]: hello" in TextFormatter().format(record)


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("connecting to postgresql://app:pg-Pa55@db:5432/app failed", "pg-Pa55"),
        ("amqp://guest:guest-pw@127.0.0.1:5672/%2F is down", "guest-pw"),
        ("Authorization: Bearer abc.DEF-123_token", "abc.DEF-123_token"),
        ("host=db user=app password=hunter2 dbname=app", "hunter2"),
    ],
)
def test_secrets_are_masked_in_log_lines(text: str, secret: str) -> None:
    assert secret not in redact(text)
    try:
        raise RuntimeError(text)
    except RuntimeError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, text, (), sys.exc_info())
    for formatter in (JsonFormatter(), TextFormatter()):
        assert secret not in formatter.format(record)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_logs_are_json_unless_written_to_a_terminal() -> None:
    assert use_json("auto", io.StringIO())
    assert not use_json("auto", Tty())
    assert use_json("json", Tty())
    assert not use_json("text", io.StringIO())


def test_the_cli_does_not_import_prometheus_client() -> None:
    """`serve` must set PROMETHEUS_MULTIPROC_DIR before prometheus_client is imported."""
    code = "import sys, workflows.entrypoints.cli; print('prometheus_client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_metrics_of_several_processes_add_up_and_dead_ones_leave_the_live_sums(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = textwrap.dedent(
        """
        import sys
        from workflows.entrypoints import observability as o
        o.REQUESTS.labels("GET", "/healthz", "200").inc(int(sys.argv[1]))
        o.POOL_MAX.set(10)
        print("ready", flush=True)
        if sys.argv[2] == "stay":
            sys.stdin.read()
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", worker, "3", "exit"], env=env, check=True)
    alive = subprocess.Popen(
        [sys.executable, "-c", worker, "4", "stay"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert alive.stdout is not None
        assert alive.stdout.readline() == b"ready\n"
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
        page = scrape_registry(Snapshot("postgres", queue_depth=1, outbox=None))
        labels = {"method": "GET", "route": "/healthz", "status": "200"}
        assert page.get_sample_value("workflows_http_requests_total", labels) == 7
        assert page.get_sample_value("workflows_db_pool_max_connections") == 10  # one alive
    finally:
        alive.communicate(b"")


def test_the_metrics_directory_is_emptied_or_created_and_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with metrics_directory() as created:
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(created)
        assert created.is_dir()
    assert not created.exists()
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    (tmp_path / "counter_123.db").write_bytes(b"stale")
    (tmp_path / "keep.txt").write_text("not ours")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with metrics_directory() as configured:
        assert configured == tmp_path
        assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    usage = capsys.readouterr().out
    for command in ("serve", "migrate", "stats", "relay", "prune"):
        assert command in usage
    for command in ("serve", "migrate", "stats", "relay", "prune"):
        with pytest.raises(SystemExit) as exited:
            cli.main([command, "--help"])
        assert exited.value.code == 0


def test_stats_and_relay_explain_when_the_backend_has_nothing_for_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUEUE_BACKEND", "memory")
    monkeypatch.setenv("DATABASE_URL", "postgresql://unused@127.0.0.1:1/unused")
    assert operations.stats(Settings.from_env(), as_json=False) == 2
    out, err = capsys.readouterr()
    assert (out, "inside the serving process" in err) == ("", True)  # a refusal: stderr
    assert operations.relay(Settings.from_env()) == 2
    out, err = capsys.readouterr()
    assert (out, "only QUEUE_BACKEND=rabbitmq" in err) == ("", True)


@pytest.mark.parametrize("access_log", [False, True])
def test_uvicorn_builds_access_lines_only_when_they_are_on(access_log: bool) -> None:
    # uvicorn formats a line per request whenever `uvicorn.access` has a handler, itself or
    # through its parents (`hasHandlers()`), whatever the level.
    logger = logging.getLogger("uvicorn.access")
    saved = (logger.level, logger.handlers[:], logger.propagate)
    try:
        logging.config.dictConfig(logging_config("INFO", "text", access_log))
        assert logger.hasHandlers() is access_log
    finally:
        logger.level, logger.handlers[:], logger.propagate = saved


def test_an_api_token_is_masked_wherever_a_client_put_it() -> None:
    """In a path or a query (RFC 6750's `access_token=`), which the access log writes."""
    token = "k3y-" + "Q" * 28
    path = f"/workflow/{token}?access_token={token}&limit=1"
    args = ("127.0.0.1:5", "GET", path, "1.1", 422)
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s "%s %s HTTP/%s" %d', args, None
    )
    assert redact("GET /workflow?access_token=other-token&limit=1").endswith("=***&limit=1")
    mask_values([token])
    try:
        for formatter in (JsonFormatter(), TextFormatter()):
            line = formatter.format(record)
            assert token not in line
            assert "/workflow/***?access_token=***&limit=1" in line
    finally:
        mask_values([])
    assert token in TextFormatter().format(record)  # without the setting: only the query's


def test_a_configured_token_is_masked_percent_encoded_too() -> None:
    """Client libraries encode `+` and `/` in a query value; a path may carry any escape."""
    token = "plus+Tok/en~" + "A" * 17
    mask_values([token])
    try:
        for sent in (
            "plus%2BTok%2Fen~AAAAAAAAAAAAAAAAA",
            "plus%2bTok%2fen%7eAAAAAAAAAAAAAAAAA",
            "%70lus+Tok/en~AAAAAAAAAAAAAAAAA",
        ):
            assert redact(f"GET /workflow/{sent}?t={sent} 404") == "GET /workflow/***?t=*** 404"
        assert redact("GET /workflow/plus%2BTok 404") == "GET /workflow/plus%2BTok 404"
    finally:
        mask_values([])


@pytest.mark.parametrize(("level", "written"), [("INFO", False), ("ERROR", False), ("DEBUG", True)])
def test_pika_writes_its_connection_errors_at_debug_only(level: str, written: bool) -> None:
    """Seven ERROR lines per failed attempt while the broker is away: the adapters' own
    warnings say it once, with the cause."""
    pika_logger, root = logging.getLogger("pika.adapters.base_connection"), logging.getLogger()
    saved = (root.level, root.handlers[:], logging.getLogger("pika").level)
    stream = io.StringIO()
    try:
        logging.config.dictConfig(logging_config(level, "text"))
        root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
        pika_logger.error("Full-stack connection workflow failed")
        logging.getLogger("workflows.adapters.rabbitmq.link").error("rabbitmq connection lost")
    finally:
        root.level, root.handlers[:] = saved[0], saved[1]
        logging.getLogger("pika").setLevel(saved[2])
    assert ("Full-stack connection workflow failed" in stream.getvalue()) is written
    assert "rabbitmq connection lost" in stream.getvalue()


@pytest.mark.parametrize("as_json", [True, False])
def test_a_log_line_carries_an_unpaired_surrogate_as_its_escape(as_json: bool) -> None:
    """A client's key may hold one; the line is still written, with `\\udfff` in it."""
    formatter = JsonFormatter() if as_json else TextFormatter()
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "key %s", ("a\udfff",), None)
    line = formatter.format(record)
    line.encode("utf-8")  # what the stream handler does, strictly
    assert "key a\\udfff" in (orjson.loads(line)["message"] if as_json else line)


def test_every_metric_is_in_the_readme_table_and_every_row_is_a_metric() -> None:
    """README's *Observability* table lists what a scrape can hold, no more, no less."""
    from workflows.adapters.postgres.stats import OutboxBacklog

    importlib.import_module("workflows.entrypoints.loop_watch")  # its metrics, as the app has
    full = Snapshot("rabbitmq", queue_depth=1, outbox=OutboxBacklog(1, 1.0), dead_letters=1)
    registry = scrape_registry(full)
    scraped = {family.name for family in registry.collect() if family.name.startswith("workflows_")}
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## Observability", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `workflows_")]
    documented = {
        name.removesuffix("_total")  # prometheus_client names a counter's family without it
        for row in rows
        for name in re.findall(r"`(workflows_[a-z_]+)`", row.split(" | ")[0])
    }
    assert documented == scraped
