"""The contract: openapi.yaml is valid, matches the app's routes, and is served with its docs."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from openapi_spec_validator import validate
from starlette.routing import Route

from tests.openapi_check import METHODS, assert_conforms, check_response, document
from workflows import __version__
from workflows.entrypoints.container import Container
from workflows.entrypoints.docs import OPENAPI_PATH, STATIC
from workflows.entrypoints.http import create_app

JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def checked(container: Container) -> AsyncIterator[httpx.AsyncClient]:
    """A client whose every response must conform to the document."""
    transport = httpx.ASGITransport(app=create_app(container))
    hooks = {"response": [check_response]}
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test", event_hooks=hooks
    ) as client:
        yield client


def test_the_document_is_valid_openapi_3_1() -> None:
    raw = yaml.safe_load(OPENAPI_PATH.read_text(encoding="utf-8"))
    assert raw["openapi"].startswith("3.1.")
    validate(raw)  # raises, naming the first error


def test_openapi_yaml_at_the_repository_root_is_the_served_document() -> None:
    at_root = Path(__file__).resolve().parents[2] / "openapi.yaml"
    assert at_root.is_symlink()  # a link, never a copy that could drift
    assert at_root.resolve() == OPENAPI_PATH.resolve()


def test_the_document_states_the_package_version() -> None:
    assert document().root["info"]["version"] == __version__


def test_every_example_matches_its_schema() -> None:
    doc = document()
    checked = 0
    for where, schema, example in _examples(doc.root):
        doc.validate(example, doc.deref(schema), where)
        checked += 1
    assert checked > 40


def test_the_document_lists_exactly_the_routes_the_app_serves(container: Container) -> None:
    served = {}
    for route in create_app(container).routes:
        assert isinstance(route, Route)
        if isinstance(route.endpoint, type):  # an HTTPEndpoint: its methods are attributes
            methods = {m for m in METHODS if hasattr(route.endpoint, m)}
        else:
            methods = {m.lower() for m in route.methods or ()}
        served[route.path] = methods - {"head"}
    doc = document()
    documented = {
        path: {m for m in METHODS if m in doc.deref(item)}
        for path, item in doc.root["paths"].items()
    }
    assert documented == served


async def test_openapi_yaml_is_the_file_and_openapi_json_the_same_values(
    checked: httpx.AsyncClient,
) -> None:
    as_yaml = await checked.get("/openapi.yaml")
    assert as_yaml.status_code == 200
    assert as_yaml.content == OPENAPI_PATH.read_bytes()
    as_json = await checked.get("/openapi.json")
    assert as_json.status_code == 200
    assert as_json.json() == yaml.safe_load(as_yaml.content)


async def test_docs_page_and_every_asset_it_loads_come_from_the_app(
    checked: httpx.AsyncClient,
) -> None:
    page = await checked.get("/docs")
    assert page.status_code == 200
    assert "default-src 'none'" in page.headers["content-security-policy"]
    references = _references(page.text)
    assert {"/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"} <= references
    for reference in references:
        asset = await checked.get(reference)
        assert asset.status_code == 200, reference
        assert asset.content, reference
    # Our own script starts Swagger UI on a document: that one comes from the app too.
    ours = (await checked.get("/docs/assets/docs.js")).text
    (url,) = re.findall(r"""\burl:\s*["']([^"']+)["']""", ours)
    assert (await checked.get(url)).status_code == 200


async def test_docs_name_no_url_outside_the_app(checked: httpx.AsyncClient) -> None:
    page = (await checked.get("/docs")).text
    assert all(reference.startswith("/") for reference in _references(page))
    assert not re.search(r"(https?:)?//[a-z0-9]", page, re.IGNORECASE)
    ours = (await checked.get("/docs/assets/docs.js")).text
    assert "validatorUrl: null" in ours  # Swagger UI's default posts the document elsewhere
    css = (await checked.get("/docs/assets/swagger-ui.css")).text
    assert "@import" not in css
    assert "@font-face" not in css
    assert not re.findall(r"url\(\s*(?!['\"]?data:)", css)


def test_the_vendored_swagger_ui_is_the_release_its_readme_records() -> None:
    vendored = STATIC / "swagger-ui"
    recorded = re.findall(
        r"^\s*\| `([^`]+)` \| (\d+) \| `([0-9a-f]{64})` \|$",
        (vendored / "README.md").read_text(encoding="utf-8"),
        re.MULTILINE,
    )
    assert {name for name, _, _ in recorded} == {
        "swagger-ui-bundle.js",
        "swagger-ui.css",
        "favicon-32x32.png",
    }
    for name, size, digest in recorded:
        content = (vendored / name).read_bytes()
        assert (len(content), hashlib.sha256(content).hexdigest()) == (int(size), digest), name


async def test_an_unknown_asset_is_a_404_problem(checked: httpx.AsyncClient) -> None:
    assert (await checked.get("/docs/assets/swagger-ui.css.map")).status_code == 404
    response = await checked.get("/docs/assets/index.html")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


async def test_every_operation_answers_as_documented(checked: httpx.AsyncClient) -> None:
    """One pass over every operation, each response checked by the client's hook."""
    for prefix in ("", "/v1"):
        created = await checked.post(
            f"{prefix}/workflow",
            content='{"data": [{"a": 1, "b": {"c": "x,y"}}, {"a": 1e400}], "steps": ["one"]}',
            headers=JSON,
        )
        uuid = created.json()["uuid"]
        await checked.get(f"{prefix}/workflow/{uuid}")
        await checked.get(f"{prefix}/workflow/{uuid}/csv")
        await checked.get(f"{prefix}/workflow", params={"limit": "1"})
        await checked.patch(f"{prefix}/workflow/{uuid}", json={"status": "consumed"})
        await checked.patch(f"{prefix}/workflow/{uuid}", json={"status": "inserted"})
        await checked.post(f"{prefix}/workflow/consume")
        await checked.get(f"{prefix}/workflow/consume")
        await checked.get(f"{prefix}/version")
        await checked.post(f"{prefix}/workflow", content=b"{", headers=JSON)
        await checked.post(f"{prefix}/workflow", data={"data": "x"})
        await checked.post(f"{prefix}/workflow", content=b"[" * 5000, headers=JSON)
        deep = '{"data": {"a": ' + "[" * 70 + "]" * 70 + "}}"
        await checked.post(f"{prefix}/workflow", content=deep, headers=JSON)
        await checked.patch(f"{prefix}/workflow/{uuid}", data={"status": "x"})
        await checked.get(f"{prefix}/workflow/not-a-uuid/csv")
        await checked.get(f"{prefix}/workflow/0190b6d4-0000-7000-8000-000000000000")
        await checked.get(f"{prefix}/workflow", params={"after": "nope"})
        await checked.delete(f"{prefix}/workflow/consume")
    for path in ("/healthz", "/readyz", "/openapi.json", "/docs", "/nowhere"):
        await checked.get(path)
    head = await checked.head("/healthz")
    assert head.status_code == 200


def _response(request: httpx.Request, status: int, body: bytes, **headers: str) -> httpx.Response:
    """A response as the app would send it: with an `X-Request-ID` unless one is given."""
    headers = {"x-request-id": "0123456789abcdef0123456789abcdef", **headers}
    return httpx.Response(status, content=body, headers=headers, request=request)


PROBLEM = {"content-type": "application/problem+json"}
UNAUTHORIZED = (
    b'{"type": "/problems/unauthorized", "title": "Unauthorized", "status": 401, "detail": "d"}'
)


@pytest.mark.parametrize(
    ("method", "path", "status", "body", "headers", "complaint"),
    [
        ("GET", "/workflow/consume", 201, b"", {}, "status 201 is not documented"),
        ("GET", "/workflow/consume", 204, b"x", {}, "no body"),
        ("POST", "/workflow", 201, b"{}", {"content-type": "application/json"}, "Location"),
        ("GET", "/healthz", 200, b'{"status": "ok"}', {"content-type": "text/plain"}, "text/plain"),
        ("GET", "/healthz", 200, b'{"status": "up"}', {"content-type": "application/json"}, "'ok'"),
        ("GET", "/nowhere", 200, b"{}", {"content-type": "application/json"}, "no path"),
        ("PUT", "/workflow", 405, b"{}", {"allow": "GET, PUT"}, "Allow says"),
        ("GET", "/healthz", 200, b"{}", {"x-request-id": "has space"}, "header X-Request-ID"),
        ("GET", "/workflow", 401, UNAUTHORIZED, PROBLEM, "WWW-Authenticate is missing"),
        (
            "GET",
            "/workflow",
            401,
            UNAUTHORIZED,
            {**PROBLEM, "www-authenticate": "Basic realm=x"},
            "header WWW-Authenticate",
        ),
        (
            "GET",
            "/v1/workflow/consume",
            401,
            UNAUTHORIZED.replace(b"unauthorized", b"forbidden"),
            {**PROBLEM, "www-authenticate": 'Bearer realm="workflows"'},
            "/type",
        ),
        ("GET", "/healthz", 401, UNAUTHORIZED, PROBLEM, "status 401 is not documented"),
        ("GET", "/openapi.json", 401, UNAUTHORIZED, PROBLEM, "status 401 is not documented"),
    ],
)
def test_a_response_the_document_does_not_describe_is_refused(
    method: str, path: str, status: int, body: bytes, headers: dict[str, str], complaint: str
) -> None:
    request = httpx.Request(method, f"http://test{path}")
    with pytest.raises(AssertionError, match=re.escape(complaint)):
        assert_conforms(_response(request, status, body, **headers))


def test_a_response_without_x_request_id_is_refused() -> None:
    request = httpx.Request("GET", "http://test/healthz")
    response = httpx.Response(200, json={"status": "ok"}, request=request)
    with pytest.raises(AssertionError, match="required header X-Request-ID is missing"):
        assert_conforms(response)
    response.headers["x-request-id"] = "abc"
    assert_conforms(response)


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.update(v for k, v in attrs if k in ("src", "href") and v)


def _references(html: str) -> set[str]:
    parser = _Assets()
    parser.feed(html)
    return parser.found


def _examples(node: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any], Any]]:
    """(where, schema, example) for every example beside a schema: media types,
    parameters, headers. Schemas' own `examples` are checked through their parent."""
    if isinstance(node, dict):
        if "schema" in node and isinstance(node["schema"], dict):
            if "example" in node:
                yield where, node["schema"], node["example"]
            for name, example in node.get("examples", {}).items():
                yield f"{where}/examples/{name}", node["schema"], example["value"]
        if "examples" in node and isinstance(node["examples"], list):
            for index, example in enumerate(node["examples"]):
                yield f"{where}/examples/{index}", node, example
        for key, value in node.items():
            yield from _examples(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _examples(value, f"{where}/{index}")
