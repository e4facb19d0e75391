"""Every bad input gets a clear 4xx problem and changes nothing."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import httpx
import pytest

from tests.openapi_check import check_response
from workflows.domain.model import JsonDocument, Workflow
from workflows.entrypoints.container import Container
from workflows.entrypoints.http import create_app
from workflows.entrypoints.inputs import receive_json_body
from workflows.entrypoints.problems import Problem

NOW = datetime(2026, 1, 1, tzinfo=UTC)

PROBLEM = "application/problem+json"
JSON = {"Content-Type": "application/json"}
BODY = b'{"data": {"a": 1}}'


async def assert_nothing_changed(client: httpx.AsyncClient) -> None:
    assert (await client.get("/workflow")).json() == []
    assert (await client.get("/workflow/consume")).status_code == 204


@asynccontextmanager
async def client_of(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client of `app` whose every response must be one openapi.yaml describes."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test", event_hooks={"response": [check_response]}
    ) as client:
        yield client


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, object] = response.json()
    assert body["type"] == f"/problems/{slug}"
    assert body["status"] == status
    assert isinstance(body["title"], str)
    assert isinstance(body["detail"], str)
    assert body["detail"]
    assert "Traceback" not in response.text
    return body


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        ('{"data": 1}', "/data"),
        ('{"data": "text"}', "/data"),
        ('{"data": null}', "/data"),
        ('{"data": []}', "/data"),
        ('{"data": [{"a": 1}, 2]}', "/data/1"),
        ('{"data": {"a": 1}, "steps": "one"}', "/steps"),
        ('{"data": {"a": 1}, "steps": [1]}', "/steps/0"),
        ('{"data": {"a": 1}, "steps": ["ok", ""]}', "/steps/1"),
        ('{"data": {"a": 1}, "steps": ["  "]}', "/steps/0"),
        ('{"data": {"a": 1}, "extra": true}', "/extra"),
        ('{"data": {"a": 1}, "a.b": true}', "/a.b"),  # an unknown name, as sent (RFC 6901)
        ('{"data": {"a": 1}, "x[0]": true}', "/x[0]"),
        ('{"data": {"a": 1}, "": true}', "/"),
        ('{"data": {"a": 1}, "a/b~": true}', "/a~1b~0"),
        ('{"data": {"a": 1}, "uuid": "0190b6d4-0000-7000-8000-000000000000"}', "/uuid"),
        ('{"data": {"a": 1}, "status": "consumed"}', "/status"),
        ('{"steps": []}', "/data"),
        ('{"data": {"a": "nul\\u0000"}}', "/data/a"),
        ('{"data": {"a": "\\ud800"}}', "/data/a"),
        ('{"data": {"a": 1e200000}}', "/data/a"),
        # Exponents Decimal cannot read, and a zero's that PostgreSQL refuses (a 500 before).
        ('{"data": {"a": 1e99999999999999999999}}', "/data/a"),
        ('{"data": {"a": [-1E-99999999999999999999]}}', "/data/a/0"),
        ('{"data": {"a": 0e1073741823}}', "/data/a"),
        ('{"data": {"a": 0.0e+1073741823}}', "/data/a"),
        ('{"data": {"a": 0e' + "9" * 5000 + "}}", "/data/a"),
        ('{"data": {"a": 1}, "steps": ["a\\u0000"]}', "/steps/0"),
        ("[]", ""),
        ('"data"', ""),
    ],
)
async def test_invalid_workflow_is_rejected_with_a_pointer(
    client: httpx.AsyncClient, body: str, pointer: str
) -> None:
    response = await client.post("/workflow", content=body, headers=JSON)
    problem = assert_problem(response, 422, "validation-failed")
    errors = problem["errors"]
    assert isinstance(errors, list)
    assert pointer in [e["pointer"] for e in errors]
    await assert_nothing_changed(client)


async def test_a_capped_list_of_errors_says_there_may_be_more(client: httpx.AsyncClient) -> None:
    body = '{"data": {' + ", ".join(f'"k{i}": "\\u0000"' for i in range(30)) + "}}"
    response = await client.post("/workflow", content=body, headers=JSON)
    problem = assert_problem(response, 422, "validation-failed")
    assert len(problem["errors"]) == 20  # type: ignore[arg-type]
    assert str(problem["detail"]).endswith("(and 19 more listed; there may be others)")
    two = '{"data": {"a": "\\u0000", "b": "\\u0000"}}'
    detail = (await client.post("/workflow", content=two, headers=JSON)).json()["detail"]
    assert detail.endswith("(and 1 more)")


def keys_of_their_own(rows: int, nested: bool = False) -> str:
    """A body whose data is `rows` objects, each with a key no other has (nested one level
    down with `nested`): a CSV of rows + 1 lines of `rows` columns."""
    row = '{"o": {"k%d": 1}}' if nested else '{"k%d": 1}'
    return '{"data": [' + ",".join(row % i for i in range(rows)) + "]}"


def long_key_over(keys: int, length: int) -> str:
    """A body whose data is one key of `length` characters holding `keys` keys: a CSV of
    two lines whose header repeats the long key in each of `keys` column names."""
    inner = ",".join(f'"{i:x}":1' for i in range(keys))
    return '{"data": {"' + "K" * length + '": {' + inner + "}}}"


async def test_data_whose_csv_header_would_pass_16_mib_is_rejected(
    client: httpx.AsyncClient,
) -> None:
    """An audit's 136 KB of JSON made a 500 MB header (2 GB of a worker's memory to render):
    two rows, so the cell count saw nothing wrong."""
    body = long_key_over(5_000, 4_000)  # 39 KB; names of 4,002 to 4,005 bytes: 20 MB
    response = await client.post("/workflow", content=body, headers=JSON)
    problem = assert_problem(response, 422, "validation-failed")
    errors: list[dict[str, str]] = problem["errors"]  # type: ignore[assignment]
    [only] = errors
    assert only["pointer"] == "/data"
    assert only["message"].startswith("its CSV export's header would have 20,0")
    assert only["message"].endswith(
        "bytes of column names (the keys' paths): more than the 16,777,216 allowed"
    )
    await assert_nothing_changed(client)
    fits = long_key_over(5_000, 3_000)  # 15 MB of names: stored, and its CSV made
    created = await client.post("/workflow", content=fits, headers=JSON)
    assert created.status_code == 201
    csv = await client.get(f"/workflow/{created.json()['uuid']}/csv")
    header = csv.content.split(b"\r\n", 1)[0]
    assert 15_000_000 < len(header) <= 16 * 1024 * 1024
    assert header.count(b",") == 4_999


async def test_data_whose_csv_would_pass_ten_million_cells_is_rejected(
    client: httpx.AsyncClient,
) -> None:
    for rows in (3163, 3500):  # 3,164 x 3,163 = 10,007,732 cells; then more
        response = await client.post("/workflow", content=keys_of_their_own(rows), headers=JSON)
        problem = assert_problem(response, 422, "validation-failed")
        assert problem["errors"] == [
            {
                "pointer": "/data",
                "message": f"its CSV export would have {rows + 1:,} rows (the header included)"
                f" of {rows:,} columns, {(rows + 1) * rows:,} cells: more than the 10,000,000"
                " allowed",
            }
        ]
    nested = keys_of_their_own(3163, nested=True)  # the columns are o.k0, o.k1, ...
    assert_problem(
        await client.post("/workflow", content=nested, headers=JSON), 422, "validation-failed"
    )
    await assert_nothing_changed(client)
    # 3,162 x 3,161 = 9,995,082 cells: stored (and its CSV is that wide)
    created = await client.post("/workflow", content=keys_of_their_own(3161), headers=JSON)
    assert created.status_code == 201
    csv = await client.get(f"/workflow/{created.json()['uuid']}/csv")
    assert csv.content.count(b"\r\n") == 3162
    assert csv.content.split(b"\r\n", 1)[0].count(b",") == 3160


async def test_json_nested_beyond_the_depth_limit_is_rejected(client: httpx.AsyncClient) -> None:
    deep = '{"data": {"a": ' + "[" * 70 + "]" * 70 + "}}"
    assert_problem(
        await client.post("/workflow", content=deep, headers=JSON), 422, "validation-failed"
    )
    deeper = '{"data": {"a": ' + "[" * 3000 + "]" * 3000 + "}}"
    assert_problem(
        await client.post("/workflow", content=deeper, headers=JSON), 422, "validation-failed"
    )
    await assert_nothing_changed(client)


async def test_duplicate_keys_are_rejected(client: httpx.AsyncClient) -> None:
    response = await client.post("/workflow", content='{"data": {"a": 1, "a": 2}}', headers=JSON)
    assert_problem(response, 422, "validation-failed")
    await assert_nothing_changed(client)


@pytest.mark.parametrize(
    "body", [b"{", b'{"data": {"a": 1}', b"{'data': {}}", b'{"data": NaN}', b"\xff\xfe{}"]
)
async def test_malformed_json_is_400(client: httpx.AsyncClient, body: bytes) -> None:
    assert_problem(
        await client.post("/workflow", content=body, headers=JSON), 400, "malformed-json"
    )
    await assert_nothing_changed(client)


async def test_empty_body_is_400(client: httpx.AsyncClient) -> None:
    assert_problem(await client.post("/workflow", content=b"", headers=JSON), 400, "empty-body")
    await assert_nothing_changed(client)


async def test_form_data_is_415_with_a_hint(client: httpx.AsyncClient) -> None:
    response = await client.post("/workflow", data={"data": "x"})
    body = assert_problem(response, 415, "unsupported-media-type")
    assert "Content-Type: application/json" in str(body["detail"])
    await assert_nothing_changed(client)


@pytest.mark.parametrize(
    ("media", "accepted"),
    [
        ("application/json", True),
        ("Application/JSON; charset=utf-8", True),
        ("application/merge-patch+json", True),
        ("application/vnd.example.workflow+json", True),
        ("+json", False),
        ("application/+json", False),
        ("/+json", False),
        ("application/jsonx", False),
    ],
)
async def test_a_json_type_is_json_or_a_structured_plus_json_type(
    client: httpx.AsyncClient, media: str, accepted: bool
) -> None:
    response = await client.post("/workflow", content=BODY, headers={"Content-Type": media})
    if accepted:
        assert response.status_code == 201, response.text
    else:
        assert_problem(response, 415, "unsupported-media-type")
        await assert_nothing_changed(client)


OTHER_CHARSETS = [
    "application/json; charset=utf-16",
    'application/json; charset="latin1"',
    "application/json;CHARSET=ISO-8859-1",
    "application/merge-patch+json; charset=utf-16le",
    "application/json; charset=utf-8; charset=utf-16",
    "application/json; charset=",
]


@pytest.mark.parametrize("media", OTHER_CHARSETS)
@pytest.mark.parametrize("hot", [True, False])
async def test_a_post_in_a_charset_other_than_utf_8_is_415(
    container: Container, media: str, hot: bool
) -> None:
    """JSON is UTF-8 (RFC 8259): a body declared otherwise is not read as UTF-8 anyway."""
    async with client_of(create_app(container, hot_routes=hot)) as client:
        response = await client.post("/workflow", content=BODY, headers={"Content-Type": media})
        problem = assert_problem(response, 415, "unsupported-media-type")
        assert "only UTF-8 is accepted" in str(problem["detail"])
        await assert_nothing_changed(client)


@pytest.mark.parametrize("media", OTHER_CHARSETS)
async def test_a_patch_in_a_charset_other_than_utf_8_is_415(
    client: httpx.AsyncClient, media: str
) -> None:
    created = (await client.post("/workflow", json={"data": {"a": 1}})).json()
    response = await client.patch(
        f"/workflow/{created['uuid']}",
        content=b'{"status": "consumed"}',
        headers={"Content-Type": media},
    )
    problem = assert_problem(response, 415, "unsupported-media-type")
    assert "only UTF-8 is accepted" in str(problem["detail"])
    assert response.headers["accept-patch"] == "application/json"
    assert (await client.get(f"/workflow/{created['uuid']}")).json() == created


@pytest.mark.parametrize(
    "media",
    [
        "application/json; charset=utf-8",
        "application/json;charset=UTF-8",
        'application/json; charset="utf-8"',
        'application/json; CharSet = "Utf-8" ',
        "application/json; profile=x; charset=utf-8",
    ],
)
async def test_utf_8_named_as_the_charset_is_accepted(
    client: httpx.AsyncClient, media: str
) -> None:
    created = await client.post("/workflow", content=BODY, headers={"Content-Type": media})
    assert created.status_code == 201, created.text
    patched = await client.patch(
        created.headers["location"],
        content=b'{"status": "consumed"}',
        headers={"Content-Type": media},
    )
    assert patched.json()["status"] == "consumed"


@pytest.mark.parametrize(
    "codings",
    [["gzip"], ["GZIP"], ["identity, gzip"], ["identity", "br"], ["x-unknown"]],
    ids=["gzip", "upper-case", "after-identity", "second-line", "unknown"],
)
@pytest.mark.parametrize("hot", [True, False])
async def test_a_compressed_body_is_415_with_the_codings_accepted(
    container: Container, codings: list[str], hot: bool
) -> None:
    """RFC 9110 15.5.16. The gzipped body was read as JSON, and refused as invalid UTF-8."""
    body = gzip.compress(BODY)
    async with client_of(create_app(container, hot_routes=hot)) as client:
        created = (await client.post("/workflow", content=BODY, headers=JSON)).json()
        for method, path, patch in [
            ("POST", "/workflow", False),
            ("PATCH", f"/workflow/{created['uuid']}", True),
        ]:
            headers = [("Content-Type", "application/json")]
            headers += [("Content-Encoding", coding) for coding in codings]
            response = await client.request(method, path, content=body, headers=headers)
            problem = assert_problem(response, 415, "unsupported-media-type")
            assert "must be sent uncompressed" in str(problem["detail"])
            assert response.headers["accept-encoding"] == "identity"
            assert ("accept-patch" in response.headers) == patch
        assert (await client.get("/workflow")).json() == [created]
        assert (await client.get(f"/workflow/{created['uuid']}")).json() == created


@pytest.mark.parametrize("codings", [["identity"], ["Identity, "], [""]])
async def test_a_body_sent_as_identity_is_read(
    client: httpx.AsyncClient, codings: list[str]
) -> None:
    headers = [("Content-Type", "application/json")]
    headers += [("Content-Encoding", coding) for coding in codings]
    response = await client.post("/workflow", content=BODY, headers=headers)
    assert response.status_code == 201, response.text


TWO_TYPES = [
    ("application/json", "text/plain"),
    ("text/plain", "application/json"),
    ("application/json", "application/json"),
    ("application/json; charset=utf-16", "application/json"),
]


def typed(*media: str) -> list[tuple[str, str]]:
    """One Content-Type line for each of `media`."""
    return [("Content-Type", value) for value in media]


def assert_repeated_content_type(response: httpx.Response) -> None:
    problem = assert_problem(response, 400, "invalid-request")
    assert problem["title"] == "Bad Request"
    assert problem["detail"] == (
        "more than one Content-Type header (2); send one, 'Content-Type: application/json'"
    )


@pytest.mark.parametrize("media", TWO_TYPES)
@pytest.mark.parametrize("hot", [True, False])
async def test_a_post_with_two_content_type_lines_is_a_400_that_changes_nothing(
    container: Container, media: tuple[str, str], hot: bool
) -> None:
    """Whatever they hold: the first line decided, so a body was read as JSON or refused
    as another type by the order of its lines."""
    async with client_of(create_app(container, hot_routes=hot)) as client:
        for path in ("/workflow", "/v1/workflow"):
            response = await client.post(path, content=BODY, headers=typed(*media))
            assert_repeated_content_type(response)
        await assert_nothing_changed(client)


@pytest.mark.parametrize("media", TWO_TYPES)
async def test_a_patch_with_two_content_type_lines_is_a_400_that_changes_nothing(
    client: httpx.AsyncClient, media: tuple[str, str]
) -> None:
    created = (await client.post("/workflow", json={"data": {"a": 1}})).json()
    for prefix in ("", "/v1"):
        response = await client.patch(
            f"{prefix}/workflow/{created['uuid']}",
            content=b'{"status": "consumed"}',
            headers=typed(*media),
        )
        assert_repeated_content_type(response)
    assert (await client.get(f"/workflow/{created['uuid']}")).json() == created
    assert (await client.get("/workflow/consume")).status_code == 200  # still queued


async def test_one_content_type_line_or_none_is_read_as_before(
    client: httpx.AsyncClient,
) -> None:
    created = await client.post("/workflow", content=BODY, headers=typed("application/json"))
    assert created.status_code == 201, created.text
    untyped = await client.post("/workflow", content=BODY)  # no Content-Type: read as JSON
    assert untyped.status_code == 201, untyped.text
    patched = await client.patch(created.headers["location"], content=b'{"status": "consumed"}')
    assert patched.json()["status"] == "consumed"


async def test_oversize_body_is_413(client: httpx.AsyncClient) -> None:
    big = '{"data": {"a": "' + "x" * 70_000 + '"}}'
    assert_problem(
        await client.post("/workflow", content=big, headers=JSON), 413, "payload-too-large"
    )

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: limited while streaming
        for _ in range(70):
            yield b"x" * 1000

    streamed = await client.post("/workflow", content=chunks(), headers=JSON)
    assert_problem(streamed, 413, "payload-too-large")
    await assert_nothing_changed(client)


@pytest.mark.parametrize("path", ["/workflow/not-a-uuid", "/workflow/123/csv", "/v1/workflow/zzzz"])
async def test_malformed_uuid_in_path_is_422(client: httpx.AsyncClient, path: str) -> None:
    problem = assert_problem(await client.get(path), 422, "validation-failed")
    assert problem["errors"] == [
        {"pointer": "/path/uuid", "message": problem["errors"][0]["message"]}  # type: ignore[index]
    ]


# Forms Python's UUID() reads, each as the workflow below or as another one.
NOT_HYPHENATED_UUIDS = [
    "+1a24bc3-13ec-7726-aded-389bb2c9c0e8",  # int() takes a sign
    "%201a24bc3-13ec-7726-aded-389bb2c9c0e8",  # and surrounding blanks
    "0_a24bc3-13ec-7726-aded-389bb2c9c0e8",  # and underscores: another uuid
    "01a24bc3urn:-13ec-7726-aded-389bb2c9c0e8",  # "urn:" anywhere is dropped
    "urn:uuid:01a24bc3-13ec-7726-aded-389bb2c9c0e8",
    "%7B01a24bc3-13ec-7726-aded-389bb2c9c0e8%7D",  # braces
    "01a24bc313ec7726aded389bb2c9c0e8",  # hyphens anywhere or none
    "01a24bc3-13ec7726-aded-389bb2c9c0e8-",
]


@pytest.mark.parametrize("form", NOT_HYPHENATED_UUIDS)
async def test_only_the_hyphenated_uuid_names_a_workflow(
    client: httpx.AsyncClient, container: Container, form: str
) -> None:
    uuid = UUID("01a24bc3-13ec-7726-aded-389bb2c9c0e8")
    await container.repository().add(Workflow.new(uuid, JsonDocument('{"a":1}'), (), NOW))
    for path in (f"/workflow/{form}", f"/workflow/{form}/csv", f"/v1/workflow/{form}"):
        problem = assert_problem(await client.get(path), 422, "validation-failed")
        assert problem["errors"][0]["pointer"] == "/path/uuid"  # type: ignore[index]
    patch = await client.patch(f"/workflow/{form}", json={"status": "consumed"})
    assert_problem(patch, 422, "validation-failed")
    listed = await client.get(f"/workflow?after={form}")
    assert_problem(listed, 422, "validation-failed")
    upper = await client.get(f"/workflow/{str(uuid).upper()}")  # either case is the uuid
    assert upper.status_code == 200
    assert upper.json()["status"] == "inserted"


async def test_unknown_uuid_is_404(client: httpx.AsyncClient) -> None:
    unknown = "0190b6d4-0000-7000-8000-000000000000"
    assert_problem(await client.get(f"/workflow/{unknown}"), 404, "not-found")
    assert_problem(await client.get(f"/workflow/{unknown}/csv"), 404, "not-found")
    response = await client.patch(f"/workflow/{unknown}", json={"status": "consumed"})
    assert_problem(response, 404, "not-found")
    await assert_nothing_changed(client)


@pytest.mark.parametrize(
    "body",
    [
        '{"status": "done"}',
        '{"status": null}',
        '{"status": 1}',
        "{}",
        '{"status": "consumed", "data": {}}',
    ],
)
async def test_bad_patch_is_422_and_changes_nothing(client: httpx.AsyncClient, body: str) -> None:
    created = (await client.post("/workflow", json={"data": {"a": 1}})).json()
    response = await client.patch(f"/workflow/{created['uuid']}", content=body, headers=JSON)
    assert_problem(response, 422, "validation-failed")
    assert (await client.get(f"/workflow/{created['uuid']}")).json() == created


async def test_an_unknown_patch_field_is_named_as_sent(client: httpx.AsyncClient) -> None:
    created = (await client.post("/workflow", json={"data": {"a": 1}})).json()
    body = '{"status": "consumed", "a.b": 1, "": 2}'
    response = await client.patch(f"/workflow/{created['uuid']}", content=body, headers=JSON)
    problem = assert_problem(response, 422, "validation-failed")
    assert [e["pointer"] for e in problem["errors"]] == ["/", "/a.b"]  # type: ignore[attr-defined]
    assert problem["detail"] == "/ is not a known field (and 1 more)"
    assert (await client.get(f"/workflow/{created['uuid']}")).json() == created


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=1001",
        "limit=-1",
        "limit=ten",
        "limit=99999999999999999999999",
        "limit=" + "9" * 4301,  # more digits than int() reads
        "status=done",
        "after=nope",
        "sort=desc",
        "limit=1&limit=2",
    ],
)
async def test_bad_list_query_is_422(client: httpx.AsyncClient, query: str) -> None:
    assert_problem(await client.get(f"/workflow?{query}"), 422, "validation-failed")


async def test_wrong_method_is_405_with_allow(client: httpx.AsyncClient) -> None:
    response = await client.delete("/workflow")
    assert_problem(response, 405, "method-not-allowed")
    assert set(response.headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}
    put = await client.put("/workflow/0190b6d4-0000-7000-8000-000000000000", json={})
    assert_problem(put, 405, "method-not-allowed")
    await assert_nothing_changed(client)


@pytest.mark.parametrize(
    ("path", "allow"),
    [
        ("/healthz", "GET, HEAD"),
        ("/v1/version", "GET, HEAD"),
        ("/workflow", "GET, HEAD, POST"),
        ("/workflow/0190b6d4-0000-7000-8000-000000000000", "GET, HEAD, PATCH"),
        ("/workflow/consume", "GET, POST"),
    ],
)
async def test_allow_lists_the_methods_in_one_order(
    client: httpx.AsyncClient, path: str, allow: str
) -> None:
    assert (await client.delete(path)).headers["allow"] == allow


async def test_unknown_path_is_a_404_problem(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/nowhere"), 404, "not-found")


@pytest.mark.parametrize("hot", [True, False])
async def test_an_encoded_slash_is_not_a_separator(container: Container, hot: bool) -> None:
    """RFC 3986: `%2F` is data in a segment. Decoded, `/workflow%2Fconsume` took a workflow
    under a name a proxy in front of the service does not know as the consume."""
    async with client_of(create_app(container, hot_routes=hot)) as client:
        uuid = (await client.post("/workflow", content=BODY, headers=JSON)).json()["uuid"]
        for method, path in [
            ("GET", "/workflow%2Fconsume"),
            ("POST", "/workflow%2fconsume"),
            ("GET", "/v1%2Fworkflow%2Fconsume"),
            ("GET", "/v1%2Fworkflow"),
            ("POST", "/v1%2Fworkflow"),
            ("PATCH", f"/v1%2Fworkflow/{uuid}"),
            ("GET", "/healthz%2F"),
        ]:
            assert_problem(await client.request(method, path, content=b""), 404, "not-found")
        answer = await client.get(f"/workflow/{uuid}%2Fcsv")
        errors = assert_problem(answer, 422, "validation-failed")["errors"]
        assert errors == [
            {
                "pointer": "/path/uuid",
                "message": f"'{uuid}%2Fcsv' is not a UUID (8-4-4-4-12 hex digits)",
            }
        ]
        listed = (await client.get("/workflow")).json()
        assert [(w["uuid"], w["status"]) for w in listed] == [(uuid, "inserted")]
        # Other escapes are decoded as before: %2D is a hyphen, %77 a w.
        escaped = uuid.replace("-", "%2D", 1)
        assert (await client.get(f"/%77orkflow/{escaped}")).json()["uuid"] == uuid
        assert (await client.get("/workflow/consume")).headers["x-workflow-uuid"] == uuid


@pytest.mark.parametrize(
    ("declared", "refused"),
    [("9" * 5000, True), ("0" * 5000 + "12", False), ("2000", True), ("1000", False)],
)
async def test_a_declared_length_of_any_size_is_read_as_a_number(
    declared: str, refused: bool
) -> None:
    """A Content-Length of more digits than int() reads is over the limit, not a 500."""

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    reading = receive_json_body(receive, ["application/json"], declared, 1000)
    if refused:
        with pytest.raises(Problem) as raised:
            await reading
        assert raised.value.status == 413
    else:
        assert await reading == b"{}"


@pytest.mark.parametrize(
    ("method", "body", "pointer"),
    [
        ("POST", '{"data": {"\\udfff": 1}}', "/data/\\udfff"),
        ("POST", '{"data": [{"a": {"x\\ud800": 1}}]}', "/data/0/a/x\\ud800"),
        ("POST", '{"data": {"a": 1}, "\\udfff": 1}', "/\\udfff"),
        ("PATCH", '{"status": "consumed", "\\udc00": 1}', "/\\udc00"),
    ],
)
async def test_an_unpaired_surrogate_in_a_key_is_a_422_that_names_it(
    client: httpx.AsyncClient, method: str, body: str, pointer: str
) -> None:
    """The pointer to such a key cannot be UTF-8: it shows the surrogate as its escape."""
    created = (await client.post("/workflow", json={"data": {"a": 1}})).json()
    path = "/workflow" if method == "POST" else f"/workflow/{created['uuid']}"
    response = await client.request(method, path, content=body, headers=JSON)
    problem = assert_problem(response, 422, "validation-failed")
    assert pointer in [e["pointer"] for e in problem["errors"]]  # type: ignore[attr-defined]
    assert response.headers["x-request-id"]
    assert (await client.get("/workflow")).json() == [created]


@pytest.mark.parametrize("prefix", ["", "/v1"])
async def test_head_on_consume_is_405_and_takes_nothing(
    client: httpx.AsyncClient, prefix: str
) -> None:
    """A HEAD must be safe: on the consume path GET takes a workflow, so HEAD is refused."""
    created = (await client.post("/workflow", json={"data": {"a": 1}})).json()
    response = await client.head(f"{prefix}/workflow/consume")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST"
    refused = await client.delete(f"{prefix}/workflow/consume")
    assert_problem(refused, 405, "method-not-allowed")
    assert refused.headers["allow"] == "GET, POST"
    assert (await client.get(f"/workflow/{created['uuid']}")).json()["status"] == "inserted"
    assert (await client.head(f"{prefix}/workflow/{created['uuid']}")).status_code == 200
    assert (await client.get(f"{prefix}/workflow/consume")).status_code == 200


async def test_an_unknown_query_parameter_is_422_on_every_workflow_operation(
    client: httpx.AsyncClient,
) -> None:
    """Never silently ignored, so that a misspelt parameter is seen; nothing changes."""
    created = (await client.post("/workflow", json={"data": {"a": 1}})).json()
    item = f"/workflow/{created['uuid']}"
    refused = [
        await client.post("/workflow?x=1", json={"data": {"b": 2}}),
        await client.post("/v1/workflow?stauts=inserted", json={"data": {"b": 2}}),
        await client.get(f"{item}?x=1"),
        await client.patch(f"{item}?x=1", json={"status": "consumed"}),
        await client.get(f"{item}/csv?x=1"),
        await client.get("/version?x=1"),
        await client.get("/v1/version?x=1"),
        await client.get("/workflow?x=1"),
        await client.get("/workflow/consume?x=1"),
    ]
    for response in refused:
        problem = assert_problem(response, 422, "validation-failed")
        assert problem["errors"][0]["pointer"] in ("/query/x", "/query/stauts")  # type: ignore[index]
    assert (await client.get("/workflow")).json() == [created]
    # An empty query is no parameter; the probes and the docs take whatever they are sent.
    assert (await client.get(f"{item}?")).status_code == 200
    for path in ("/healthz?x=1", "/readyz?x=1", "/openapi.json?x=1"):
        assert (await client.get(path)).status_code == 200, path


async def test_a_long_name_is_not_echoed_whole(client: httpx.AsyncClient) -> None:
    long = "x" * 60_000
    missing = await client.get(f"/{long}")
    assert_problem(missing, 404, "not-found")
    assert len(missing.content) < 1_000
    unknown = await client.get(f"/workflow?{long}=1")
    problem = assert_problem(unknown, 422, "validation-failed")
    assert problem["errors"][0]["pointer"] == "/query/" + "x" * 64 + "…"  # type: ignore[index]
    assert len(unknown.content) < 1_000
