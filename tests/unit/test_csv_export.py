"""CsvExporter by example: one test per rule of docs/csv.md."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workflows.adapters.csv_export import CsvExporter
from workflows.adapters.csv_export import exporter as exporter_module
from workflows.adapters.csv_export import render as csv_render
from workflows.adapters.csv_export.render import render_csv
from workflows.domain.errors import DependencyUnavailable
from workflows.domain.model import JsonDocument, Workflow, WorkflowStatus

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def workflow(data: str) -> Workflow:
    return Workflow.new(uuid.uuid4(), JsonDocument(data), ("step",), NOW)


def render(data: str) -> bytes:
    """What CsvExporter.render gives (on the event loop or in a thread, by size)."""
    return render_csv(workflow(data).data.text)


def records(data: str) -> list[list[str]]:
    text = render(data).decode("utf-8")
    return list(csv.reader(io.StringIO(text, newline="")))


def test_media_type_is_utf8_csv() -> None:
    assert CsvExporter("unused").media_type == "text/csv; charset=utf-8"


def test_an_object_gives_a_header_and_one_row() -> None:
    assert render('{"name":"Ada","age":36}') == b"name,age\r\nAda,36\r\n"


def test_an_array_of_objects_gives_one_row_each() -> None:
    assert records('[{"n":1},{"n":2},{"n":3}]') == [["n"], ["1"], ["2"], ["3"]]


def test_nested_objects_flatten_to_dotted_columns_at_any_depth() -> None:
    data = '{"id":1,"address":{"city":"Oslo","geo":{"lat":59.91,"lon":10.75}},"ok":true}'
    assert records(data) == [
        ["id", "address.city", "address.geo.lat", "address.geo.lon", "ok"],
        ["1", "Oslo", "59.91", "10.75", "true"],
    ]


def test_an_array_is_one_cell_of_compact_json_with_exact_numbers() -> None:
    data = '{"a":[1,2.50,{"a":null,"b":[true,false]},[],1e400,-0,"x,y"]}'
    assert records(data) == [["a"], ['[1,2.50,{"a":null,"b":[true,false]},[],1e400,-0,"x,y"]']]


def test_strings_in_an_array_cell_are_utf8_with_only_the_escapes_json_needs() -> None:
    data = r'{"a":["é\u00e9","q\"b\\","line\nbreak\u0001","\/"]}'
    assert records(data) == [["a"], [r'["éé","q\"b\\","line\nbreak\u0001","/"]']]


def test_an_array_cell_keeps_key_order_of_objects_inside_it() -> None:
    assert records('{"a":[{"z":1,"y":2}]}') == [["a"], ['[{"z":1,"y":2}]']]


def test_null_is_an_empty_cell() -> None:
    assert render('{"a":null,"b":1}') == b"a,b\r\n,1\r\n"


def test_booleans_are_true_and_false() -> None:
    assert records('{"a":true,"b":false}') == [["a", "b"], ["true", "false"]]


@pytest.mark.parametrize(
    "number",
    [
        "2.50",
        "-0",
        "-0.0",
        "1e400",
        "1E+400",
        "0.0000001",
        "12345678901234567890.12345678901234567890",
        "9" * 5000,
        "-" + "1" * 4301,
    ],
)
def test_numbers_are_written_exactly_as_the_client_sent_them(number: str) -> None:
    assert records(f'{{"n":{number}}}') == [["n"], [number]]


def test_columns_follow_the_clients_key_order_not_alphabetical() -> None:
    assert records('{"b":1,"a":2,"c":3}')[0] == ["b", "a", "c"]


def test_columns_appear_in_order_of_first_appearance_across_rows() -> None:
    data = '[{"a":{"x":1},"b":2},{"c":3,"a":{"y":4}}]'
    assert records(data) == [
        ["a.x", "b", "c", "a.y"],
        ["1", "2", "", ""],
        ["", "", "3", "4"],
    ]


def test_the_same_path_in_different_rows_shares_one_column() -> None:
    data = '[{"a":{"b":1}},{"a":{"b":2}}]'
    assert records(data) == [["a.b"], ["1"], ["2"]]


def test_a_row_missing_a_column_gets_an_empty_cell() -> None:
    assert render('[{"a":1,"b":2},{"b":3}]') == b"a,b\r\n1,2\r\n,3\r\n"


def test_a_path_holding_a_value_in_one_row_and_an_object_in_another_keeps_both() -> None:
    assert records('[{"a":1},{"a":{"b":2}}]') == [["a", "a.b"], ["1", ""], ["", "2"]]


def test_a_dotted_key_colliding_with_a_nested_path_gets_a_suffix() -> None:
    assert records('{"a.b":1,"a":{"b":2}}') == [["a.b", "a.b~2"], ["1", "2"]]


def test_a_collision_takes_the_first_unused_suffix() -> None:
    data = '{"a.b":1,"a.b~2":2,"a":{"b":3},"a.b~3":4}'
    assert records(data)[0] == ["a.b", "a.b~2", "a.b~3", "a.b~3~2"]


def test_suffixes_are_stable_across_rows() -> None:
    data = '[{"a.b":1},{"a":{"b":2}},{"a.b":3,"a":{"b":4}}]'
    assert records(data) == [["a.b", "a.b~2"], ["1", ""], ["", "2"], ["3", "4"]]


def test_an_empty_nested_object_is_a_cell_with_braces() -> None:
    assert records('{"a":{},"b":1}') == [["a", "b"], ["{}", "1"]]


def test_an_empty_object_gives_an_empty_header_line_and_an_empty_row() -> None:
    assert render("{}") == b"\r\n\r\n"


def test_an_empty_array_gives_an_empty_header_line_only() -> None:
    assert render("[]") == b"\r\n"


def test_a_row_whose_only_cell_is_empty_is_quoted_so_it_is_not_a_blank_line() -> None:
    assert render('[{"a":1},{}]') == b'a\r\n1\r\n""\r\n'


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ('"a,b"', b'"a,b"'),
        ('"say \\"hi\\""', b'"say ""hi"""'),
        ('"two\\nlines"', b'"two\nlines"'),
        ('"cr\\rhere"', b'"cr\rhere"'),
        ('"crlf\\r\\n"', b'"crlf\r\n"'),
    ],
)
def test_fields_with_comma_quote_cr_or_lf_are_quoted_with_quotes_doubled(
    value: str, field: bytes
) -> None:
    assert render(f'{{"k":{value}}}') == b"k\r\n" + field + b"\r\n"


def test_other_fields_are_not_quoted_and_keep_their_spaces() -> None:
    assert render('{"k":" padded ","t":"a\\tb"}') == b"k,t\r\n padded ,a\tb\r\n"


def test_every_line_ends_with_crlf() -> None:
    assert render('[{"a":1},{"a":2}]').split(b"\r\n") == [b"a", b"1", b"2", b""]


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\\t", "\\r"])
def test_a_string_that_could_start_a_formula_gets_a_quote_prefix(start: str) -> None:
    cells = records(f'{{"k":"{start}SUM(A1)"}}')[1]
    assert cells == ["'" + start.replace("\\t", "\t").replace("\\r", "\r") + "SUM(A1)"]


def test_negative_numbers_are_never_prefixed() -> None:
    assert records('{"n":-5,"d":-2.50e-3}') == [["n", "d"], ["-5", "-2.50e-3"]]


def test_a_string_that_looks_like_a_negative_number_is_prefixed() -> None:
    assert records('{"n":"-5"}') == [["n"], ["'-5"]]


def test_header_names_are_neutralised_like_any_string() -> None:
    assert records('{"=cmd":1,"a":{"@b":2}}')[0] == ["'=cmd", "a.@b"]


def test_neutralised_header_names_stay_unique() -> None:
    assert records('{"=a":1,"\'=a":2}')[0] == ["'=a", "'=a~2"]


def test_unicode_is_written_as_utf8_without_bom() -> None:
    content = render('{"città":"Zürich 🚆","日本":"東京"}')
    assert content == "città,日本\r\nZürich 🚆,東京\r\n".encode()
    assert not content.startswith(b"\xef\xbb\xbf")


def test_a_first_name_starting_with_u_feff_is_quoted_so_it_never_reads_as_a_bom() -> None:
    content = render('{"\ufeffid":1,"b":2}')
    assert content == '"\ufeffid","b"\r\n1,2\r\n'.encode()
    assert records('{"\ufeffid":1,"b":2}')[0] == ["\ufeffid", "b"]


def test_a_lone_surrogate_becomes_a_replacement_character() -> None:
    assert records('{"k":"a\\ud800b"}') == [["k"], ["a\ufffdb"]]


def test_a_lone_surrogate_in_an_array_cell_becomes_a_replacement_character() -> None:
    assert records('{"k":["a\\ud800b",{"x":"\\udc00"}]}') == [
        ["k"],
        ['["a\ufffdb",{"x":"\ufffd"}]'],
    ]


def test_deeply_nested_objects_and_arrays_render() -> None:
    depth = 400
    data = '{"a":' * depth + "[" * depth + "1" + "]" * depth + "}" * depth
    header, row = records(data)
    assert header == [".".join(["a"] * depth)]
    assert row == ["[" * depth + "1" + "]" * depth]


async def test_render_depends_on_the_data_alone() -> None:
    one = workflow('{"a":1}')
    other = Workflow(
        uuid.uuid4(), WorkflowStatus.CONSUMED, one.data, ("x", "y"), NOW, datetime.now(UTC)
    )
    exporter = CsvExporter("unused")
    assert await exporter.render(one) == await exporter.render(other)


@pytest.mark.parametrize("data", ['"text"', "5", "[1,2]", '[{"a":1},2]', "null"])
def test_a_document_that_is_not_objects_is_rejected(data: str) -> None:
    with pytest.raises(ValueError, match="object"):
        render(data)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_json_constants_are_rejected(constant: str) -> None:
    with pytest.raises(ValueError, match="not JSON"):
        render(f'{{"a":{constant}}}')


# write -----------------------------------------------------------------------------


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


async def test_write_creates_the_directory_and_stores_uuid_csv(tmp_path: Path) -> None:
    directory = tmp_path / "exports" / "nested"
    item = workflow('{"a":1}')
    await CsvExporter(directory).write(item, b"a\r\n1\r\n")
    assert listing(directory) == [f"{item.uuid}.csv"]
    assert (directory / f"{item.uuid}.csv").read_bytes() == b"a\r\n1\r\n"


async def test_write_replaces_an_existing_export(tmp_path: Path) -> None:
    item = workflow('{"a":1}')
    exporter = CsvExporter(str(tmp_path))
    await exporter.write(item, b"old\r\n")
    await exporter.write(item, b"new\r\n")
    assert listing(tmp_path) == [f"{item.uuid}.csv"]
    assert (tmp_path / f"{item.uuid}.csv").read_bytes() == b"new\r\n"


@pytest.mark.parametrize("fresh", [False, True], ids=["fsynced", "flushed-behind"])
@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
async def test_write_gives_the_file_ordinary_permissions(
    tmp_path: Path, fresh: bool, umask: int, mode: int
) -> None:
    item = workflow('{"a":1}')
    exporter = CsvExporter(tmp_path, wall_clock=NOW.timestamp)
    previous = os.umask(umask)
    try:
        await exporter.write(item, b"a\r\n", NOW if fresh else None)
    finally:
        os.umask(previous)
    assert (tmp_path / f"{item.uuid}.csv").stat().st_mode & 0o777 == mode


async def test_a_failed_write_keeps_the_previous_export_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    item = workflow('{"a":1}')
    exporter = CsvExporter(tmp_path)
    await exporter.write(item, b"old\r\n")

    def failing_replace(source: str, target: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(DependencyUnavailable, match="No space left"):
        await exporter.write(item, b"new\r\n")
    assert listing(tmp_path) == [f"{item.uuid}.csv"]
    assert (tmp_path / f"{item.uuid}.csv").read_bytes() == b"old\r\n"


async def test_an_unusable_export_directory_is_reported_as_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"")
    with pytest.raises(DependencyUnavailable, match="export directory"):
        await CsvExporter(blocker).write(workflow("{}"), b"\r\n\r\n")


async def test_concurrent_writes_of_one_export_each_leave_a_whole_file(tmp_path: Path) -> None:
    item = workflow('{"a":1}')
    exporter = CsvExporter(tmp_path)
    contents = [bytes([65 + n]) * 100_000 for n in range(8)]
    await asyncio.gather(*(exporter.write(item, content) for content in contents))
    assert listing(tmp_path) == [f"{item.uuid}.csv"]
    assert (tmp_path / f"{item.uuid}.csv").read_bytes() in contents


def large_workflow() -> Workflow:
    rows = ",".join(f'{{"n":{n},"text":"row {n}"}}' for n in range(1000))
    item = workflow(f"[{rows}]")
    assert len(item.data.text) > exporter_module.RENDER_ON_LOOP_MAX
    return item


async def test_a_large_document_is_rendered_while_the_event_loop_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The render of a document over RENDER_ON_LOOP_MAX holds up no other request: here it
    cannot finish until this coroutine, on the same loop, lets it."""
    started, release = threading.Event(), threading.Event()

    def render_when_released(text: str) -> bytes:
        started.set()
        release.wait(10)  # on the event loop, this would stop it for 10 s
        return render_csv(text)

    monkeypatch.setattr(exporter_module, "render_csv", render_when_released)
    item = large_workflow()
    rendering = asyncio.create_task(CsvExporter("unused").render(item))
    assert await asyncio.to_thread(started.wait, 10)
    assert not rendering.done()  # the loop ran this coroutine while the render was under way
    release.set()
    assert await rendering == render_csv(item.data.text)


async def test_a_small_document_is_rendered_on_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_thread(*_: object) -> object:
        raise AssertionError("a small document went to a thread")

    monkeypatch.setattr(exporter_module, "offload", no_thread)
    text = '{"a":' + '"' + "x" * (exporter_module.RENDER_ON_LOOP_MAX - 10) + '"}'
    assert len(text) <= exporter_module.RENDER_ON_LOOP_MAX
    assert await CsvExporter("unused").render(workflow(text)) == render_csv(text)


async def test_a_short_document_of_many_cells_is_rendered_in_a_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    threaded: list[object] = []
    from workflows.adapters.offload import offload

    async def recorded(function: Callable[..., bytes], *args: object) -> bytes:
        threaded.append(function)
        return await offload(function, *args)

    monkeypatch.setattr(exporter_module, "offload", recorded)
    text = "[" + ",".join(f'{{"k{i}":1}}' for i in range(700)) + "]"  # 701 x 700 cells
    assert len(text) <= exporter_module.RENDER_ON_LOOP_MAX
    assert await CsvExporter("unused").render(workflow(text)) == render_csv(text)
    assert threaded == [render_csv]
    dense = "[" + ",".join(f'{{"a":{i},"b":"x"}}' for i in range(200)) + "]"  # 201 x 2 cells
    assert len(dense) <= exporter_module.RENDER_ON_LOOP_MAX
    assert await CsvExporter("unused").render(workflow(dense)) == render_csv(dense)
    assert threaded == [render_csv]  # on the loop: 201 x 400 by the bound


async def test_a_probe_of_a_directory_whose_filesystem_hangs_fails_in_its_timeout_and_once(
    tmp_path: Path, hanging_probes: tuple[threading.Event, list[str]]
) -> None:
    """A filesystem that hangs (an NFS server gone; here a probe that waits for an event)
    fails /readyz's check within PROBE_TIMEOUT; while that probe's thread is still held,
    the next check fails at once and holds no other thread; once it returns, a probe
    passes again."""
    release, probes = hanging_probes
    exporter = CsvExporter(tmp_path / "exports")
    loop = asyncio.get_running_loop()
    try:
        began = loop.time()
        with pytest.raises(DependencyUnavailable, match=r"no answer within 0\.3 s"):
            await exporter.ping()
        assert 0.3 <= loop.time() - began < 2.0
        began = loop.time()
        with pytest.raises(DependencyUnavailable, match="the last probe has not returned"):
            await exporter.ping()
        assert loop.time() - began < 0.1
        assert len(probes) == 1  # no second thread held
    finally:
        release.set()
    for _ in range(100):  # the held probe returns, and then a probe passes again
        try:
            await exporter.ping()
            break
        except DependencyUnavailable:
            await asyncio.sleep(0.05)
    else:
        raise AssertionError("no probe passed after the filesystem came back")
    assert len(probes) == 2


@pytest.fixture
def hanging_probes(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, list[str]]]:
    """Probes that wait for the event before they make their file, as on a filesystem that
    hangs until it is set; PROBE_TIMEOUT 0.3 s."""
    from workflows.adapters.csv_export import files

    monkeypatch.setattr(exporter_module, "PROBE_TIMEOUT", 0.3)
    real_probe = files.probe_directory
    release = threading.Event()
    probes: list[str] = []

    def hanging_probe(directory: str) -> None:
        probes.append(directory)
        release.wait(10)
        real_probe(directory)

    monkeypatch.setattr(files, "probe_directory", hanging_probe)
    yield release, probes
    release.set()


async def test_flush_probes_the_directory_and_a_write_fails_at_once_while_that_probe_is_late(
    tmp_path: Path, hanging_probes: tuple[threading.Event, list[str]]
) -> None:
    """A consume's write is made on the event loop: into a filesystem that hangs it would
    hold every request of the process. Once a probe (`flush` starts one every PROBE_EVERY)
    is PROBE_TIMEOUT late, a write fails at once, touching nothing, until it returns."""
    release, probes = hanging_probes
    exporter = CsvExporter(tmp_path / "exports")
    item = workflow('{"a":1}')
    await exporter.flush()  # nothing to flush, but a probe starts
    await exporter.flush()  # not a second one while it runs
    await asyncio.sleep(0.05)  # for its thread to begin
    assert len(probes) == 1
    await exporter.write(item, b"a\r\n1\r\n", item.updated_at)  # not late yet
    await asyncio.sleep(0.35)
    began = asyncio.get_running_loop().time()
    with pytest.raises(DependencyUnavailable, match=r"a probe has not returned for 0 s"):
        await exporter.write(item, b"a\r\n2\r\n", item.updated_at)
    assert asyncio.get_running_loop().time() - began < 0.1
    assert (tmp_path / "exports" / f"{item.uuid}.csv").read_bytes() == b"a\r\n1\r\n"
    release.set()
    for _ in range(100):
        if exporter._probing is not None and exporter._probing.done():
            break
        await asyncio.sleep(0.01)
    await exporter.write(item, b"a\r\n2\r\n", item.updated_at)
    assert (tmp_path / "exports" / f"{item.uuid}.csv").read_bytes() == b"a\r\n2\r\n"
    await exporter.flush()  # within PROBE_EVERY of the last: no new probe
    assert len(probes) == 1
    exporter.close()


async def test_a_ping_waits_for_a_probe_that_is_running_but_not_late(
    tmp_path: Path, hanging_probes: tuple[threading.Event, list[str]]
) -> None:
    release, probes = hanging_probes
    exporter = CsvExporter(tmp_path / "exports")
    await exporter.flush()
    await asyncio.sleep(0.05)
    assert len(probes) == 1  # the flush's, running
    asyncio.get_running_loop().call_later(0.1, release.set)
    await exporter.ping()  # the flush's probe, answered within PROBE_TIMEOUT of its start
    assert len(probes) == 1


# --- lines written as csv.writer writes them ------------------------------------------

CELL = st.text(
    alphabet=st.sampled_from(list(",\"\r\n \t'=a\ufeffé€\U0001f600")), max_size=6
) | st.text(max_size=6)


def csv_writer_text(names: list[str], flat_rows: list[list[tuple[int, str]]]) -> str:
    """The lines as `csv.writer` writes them (what render.py used until session 32): the
    reference its own quoting is held to."""
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\r\n")
    if names and names[0].startswith("\ufeff"):
        csv.writer(out, lineterminator="\r\n", quoting=csv.QUOTE_ALL).writerow(names)
    else:
        writer.writerow(names)
    for cells in flat_rows:
        line = [""] * len(names)
        for column, cell in cells:
            line[column] = cell
        writer.writerow(line)
    return out.getvalue()


@st.composite
def table(draw: st.DrawFn) -> tuple[list[str], list[list[tuple[int, str]]]]:
    names = draw(st.lists(CELL, max_size=5))
    rows = draw(
        st.lists(
            st.dictionaries(st.integers(0, len(names) - 1), CELL) if names else st.just({}),
            max_size=4,
        )
    )
    return names, [sorted(row.items()) for row in rows]


@settings(max_examples=500)
@given(table())
def test_the_lines_are_what_csv_writer_writes(
    drawn: tuple[list[str], list[list[tuple[int, str]]]],
) -> None:
    names, flat_rows = drawn
    assert csv_render._csv_text(names, flat_rows) == csv_writer_text(names, flat_rows)


@pytest.mark.parametrize(
    ("names", "rows"),
    [
        ([""], [[(0, "")]]),  # a lone empty cell: `""`, never a blank line
        (["a", "b"], [[]]),  # two empty cells: `,`
        ([], [[], []]),  # an empty object: empty lines
        (["\ufeffa", "", 'q"'], [[(1, "x,y")]]),  # every name quoted after a leading U+FEFF
        (["a"], [[(0, 'say "hi"\r\nbye')]]),
    ],
)
def test_the_edges_of_csv_writer_are_kept(
    names: list[str], rows: list[list[tuple[int, str]]]
) -> None:
    assert csv_render._csv_text(names, rows) == csv_writer_text(names, rows)
