"""The document's security, against the app: bearer tokens only when API_TOKENS is set.

openapi.yaml declares `security: [{}, {bearerAuth: []}]` (no credentials, or a bearer
token: which one depends on the server's configuration), `security: []` on the public
operations, a `401` on every other one, and `X-Request-ID` on every request and
response. These tests hold the app to that with tokens configured: every response,
401s included, is checked against the document (`assert_conforms`). A 401 for a path or
method the document does not list is checked against its `Unauthorized` response, as
its introduction says (openapi_check.py itself expects 404 and 405 there).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import schemathesis
from hypothesis import settings as hypothesis_settings

from tests.openapi_check import METHODS, assert_conforms, document
from tests.unit.test_schemathesis import shorten_wait
from workflows.entrypoints.config import Settings
from workflows.entrypoints.container import Container
from workflows.entrypoints.docs import OPENAPI_PATH
from workflows.entrypoints.http import create_app
from workflows.entrypoints.security import PUBLIC_PATHS, BearerAuthMiddleware, unauthorized

TOKEN = "x" * 32
WRONG = "y" * 32
UUID = "0190b6d4-0000-7000-8000-000000000000"
SCHEMATHESIS_EXAMPLES = 10
CHALLENGE = 'Bearer realm="workflows"'
INVALID = 'Bearer realm="workflows", error="invalid_token"'
REPEATED = 'Bearer realm="workflows", error="invalid_request"'
JSON = {"Content-Type": "application/json"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def guarded(tmp_path: Path) -> Settings:
    return Settings(queue_backend="memory", export_dir=tmp_path, api_tokens=(TOKEN,))


@asynccontextmanager
async def checked_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client whose every response must be one the document describes."""
    transport = httpx.ASGITransport(app=create_app(Container(settings=settings)))
    hooks = {"response": [conforms]}
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test", event_hooks=hooks
    ) as client:
        yield client


async def conforms(response: httpx.Response) -> None:
    await response.aread()
    if response.status_code == 401 and not is_documented(response.request):
        assert_is_the_documented_401(response)
    else:
        assert_conforms(response)


def is_documented(request: httpx.Request) -> bool:
    found = document().path_item(request.url.path)
    method = "get" if request.method == "HEAD" else request.method.lower()
    return found is not None and method in found[1]


def assert_is_the_documented_401(response: httpx.Response) -> None:
    """The `Unauthorized` response: its headers and, as problem+json, its body."""
    doc = document()
    spec = doc.component("responses", "Unauthorized")
    for name, header in spec["headers"].items():
        header = doc.deref(header)
        value = response.headers.get(name)
        assert value is not None or not header["required"], f"{name} is missing"
        if value is not None:
            doc.validate(value, header["schema"], f"401 header {name}")
    assert response.headers["content-type"] in spec["content"]
    schema = spec["content"][response.headers["content-type"]]["schema"]
    doc.validate(response.json(), schema, "401 body")


# --- What the document says ---------------------------------------------------------


def operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(METHOD, path template, operation) for every operation of the document."""
    doc = document()
    for template, item in doc.root["paths"].items():
        item = doc.deref(item)
        for method in METHODS:
            if method in item:
                yield method.upper(), template, item[method]


def is_public(operation: dict[str, Any]) -> bool:
    return operation.get("security", document().root["security"]) == []


def concrete(template: str) -> str:
    return template.replace("{uuid}", UUID).replace("{asset}", "docs.js")


PROTECTED = [(m, t) for m, t, op in operations() if not is_public(op)]
PUBLIC = [(m, t) for m, t, op in operations() if is_public(op)]
BODIES = {
    ("POST", "/workflow"): b'{"data": {"a": 1}, "steps": ["one"]}',
    ("PATCH", "/workflow/{uuid}"): b'{"status": "consumed"}',
}


def body_for(method: str, template: str) -> bytes | None:
    return BODIES.get((method, template.removeprefix("/v1")))


def test_the_document_makes_bearer_auth_optional_and_defines_it() -> None:
    root = document().root
    assert root["security"] == [{}, {"bearerAuth": []}]
    scheme = root["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert "API_TOKENS" in scheme["description"]


def test_the_public_operations_are_those_the_middleware_lets_through() -> None:
    """`security: []` exactly where a request needs no token even with API_TOKENS set.

    /metrics is the one configurable path: public by default (METRICS_PUBLIC), so the
    document gives it the optional security and a 401, like the protected operations.
    """
    middleware = BearerAuthMiddleware(app=None, tokens=(TOKEN,), public=PUBLIC_PATHS)  # type: ignore[arg-type]
    for method, template, operation in operations():
        path = concrete(template)
        assert is_public(operation) == middleware.is_public(path), f"{method} {template}"
    assert ("GET", "/metrics") in PROTECTED
    assert len(PROTECTED) == 15  # 7 workflow operations, at the root and under /v1; /metrics


def test_every_protected_operation_documents_the_401_and_no_public_one_does() -> None:
    for method, template, operation in operations():
        answers = operation["responses"]
        if is_public(operation):
            assert "401" not in answers, f"{method} {template}"
        else:
            assert answers.get("401") == {
                "$ref": "urn:workflows:openapi#/components/responses/Unauthorized"
            }, f"{method} {template}"


def test_every_request_and_response_documents_x_request_id() -> None:
    doc = document()
    request_id = {"$ref": "urn:workflows:openapi#/components/parameters/RequestId"}
    for method, template, operation in operations():
        item = doc.deref(doc.root["paths"][template])
        assert request_id in item.get("parameters", []) + operation.get("parameters", []), (
            f"{method} {template}"
        )
        for status, answer in operation["responses"].items():
            headers = doc.deref(answer).get("headers", {})
            assert doc.deref(headers.get("X-Request-ID", {})) == doc.component(
                "headers", "RequestId"
            ), f"{method} {template} {status}"
    for name in ("NotFound", "MethodNotAllowed", "Unauthorized"):
        assert "X-Request-ID" in doc.component("responses", name)["headers"], name


def test_the_401_problem_type_is_the_one_the_middleware_sends() -> None:
    doc = document()
    spec = doc.component("responses", "Unauthorized")
    schema = spec["content"]["application/problem+json"]["schema"]
    for error in (None, "invalid_token"):
        response = unauthorized("the detail", error=error).response()
        doc.validate(json.loads(bytes(response.body)), schema, f"the 401 problem ({error})")
        challenge = response.headers["www-authenticate"]
        doc.validate(challenge, doc.deref(spec["headers"]["WWW-Authenticate"])["schema"], challenge)


# --- What the app answers, with API_TOKENS set --------------------------------------


@pytest.mark.parametrize(("method", "template"), PROTECTED)
async def test_a_protected_operation_needs_the_token(
    guarded: Settings, method: str, template: str
) -> None:
    path = concrete(template)
    content = body_for(method, template)
    typed = JSON if content is not None else {}
    # /metrics is protected only with METRICS_PUBLIC=false (its default is tested below).
    async with checked_client(attrs.evolve(guarded, metrics_public=False)) as client:
        missing = await client.request(method, path, content=content, headers=typed)
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == CHALLENGE
        assert missing.json()["type"] == "/problems/unauthorized"
        wrong = await client.request(
            method, path, content=content, headers={**typed, **bearer(WRONG)}
        )
        assert wrong.status_code == 401
        assert wrong.headers["www-authenticate"] == INVALID
        right = await client.request(
            method, path, content=content, headers={**typed, **bearer(TOKEN)}
        )
        assert right.status_code != 401


@pytest.mark.parametrize(("method", "template"), PROTECTED)
@pytest.mark.parametrize("second", [TOKEN, WRONG], ids=["both right", "one wrong"])
async def test_two_authorization_headers_on_a_protected_operation_are_a_400(
    guarded: Settings, method: str, template: str, second: str
) -> None:
    """Which line would be the credentials? Neither: refused before anything is read."""
    content = body_for(method, template)
    typed = list(JSON.items()) if content is not None else []
    twice = [("Authorization", f"Bearer {TOKEN}"), ("Authorization", f"Bearer {second}")]
    async with checked_client(attrs.evolve(guarded, metrics_public=False)) as client:
        response = await client.request(
            method, concrete(template), content=content, headers=twice + typed
        )
        assert response.status_code == 400
        assert response.headers["www-authenticate"] == REPEATED
        problem = response.json()
        assert problem["type"] == "/problems/invalid-request"
        assert "more than one Authorization header" in problem["detail"]


@pytest.mark.parametrize(("method", "template"), PUBLIC)
async def test_a_public_operation_needs_no_token_and_ignores_a_wrong_one(
    guarded: Settings, method: str, template: str
) -> None:
    async with checked_client(guarded) as client:
        assert (await client.request(method, concrete(template))).status_code == 200
        wrong = await client.request(method, concrete(template), headers=bearer(WRONG))
        assert wrong.status_code == 200


@pytest.mark.parametrize(
    "authorization",
    [f"Basic {TOKEN}", TOKEN, f"Bearer {TOKEN}x", "Bearer ", f"Bearer {TOKEN} {TOKEN}"],
)
async def test_another_scheme_or_a_mangled_token_is_the_invalid_token_401(
    guarded: Settings, authorization: str
) -> None:
    async with checked_client(guarded) as client:
        response = await client.post("/workflow/consume", headers={"Authorization": authorization})
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == INVALID


async def test_the_scheme_name_is_case_insensitive(guarded: Settings) -> None:
    async with checked_client(guarded) as client:
        response = await client.get("/workflow", headers={"Authorization": f"bEaReR {TOKEN}"})
        assert response.status_code == 200


async def test_head_on_a_protected_operation_is_a_401_without_a_body(guarded: Settings) -> None:
    async with checked_client(guarded) as client:
        response = await client.head("/v1/workflow")
        assert response.status_code == 401
        assert response.content == b""
        assert response.headers["www-authenticate"] == CHALLENGE


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nowhere", 404),
        ("GET", "/workflow/", 404),
        ("DELETE", "/workflow", 405),
        ("PUT", f"/v1/workflow/{UUID}", 405),
    ],
)
async def test_without_a_token_an_undocumented_path_or_method_is_a_401_first(
    guarded: Settings, method: str, path: str, status: int
) -> None:
    """The token is checked before routing: nothing says which paths exist."""
    async with checked_client(guarded) as client:
        refused = await client.request(method, path)
        assert refused.status_code == 401
        answered = await client.request(method, path, headers=bearer(TOKEN))
        assert answered.status_code == status


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/docs/nowhere", 404),
        ("GET", "/docs/assets/nothing.js", 404),
        ("POST", "/healthz", 405),
        ("DELETE", "/v1/version", 405),
        ("POST", "/metrics", 405),  # public by default (METRICS_PUBLIC), whatever the method
    ],
)
async def test_under_public_paths_404_and_405_need_no_token(
    guarded: Settings, method: str, path: str, status: int
) -> None:
    async with checked_client(guarded) as client:
        assert (await client.request(method, path)).status_code == status


async def test_metrics_need_the_token_when_not_public(guarded: Settings) -> None:
    private = attrs.evolve(guarded, metrics_public=False)
    async with checked_client(private) as client:
        refused = await client.get("/metrics")
        assert refused.status_code == 401
        assert (await client.get("/metrics", headers=bearer(WRONG))).status_code == 401
        assert (await client.get("/metrics", headers=bearer(TOKEN))).status_code == 200
    async with checked_client(guarded) as client:  # METRICS_PUBLIC=true, the default
        assert (await client.get("/metrics")).status_code == 200


@pytest.mark.parametrize(
    ("given", "echoed"),
    [
        ("checkout-7f3a9c", True),
        ("a:b/c+d=e~f_g.h", True),
        ("not valid", False),
        ("x" * 129, False),
    ],
)
async def test_a_401_carries_the_request_id(guarded: Settings, given: str, echoed: bool) -> None:
    async with checked_client(guarded) as client:
        response = await client.get("/workflow", headers={"X-Request-ID": given})
        assert response.status_code == 401
        rid = response.headers["x-request-id"]
        assert (rid == given) is echoed
        if not echoed:
            assert re.fullmatch(r"[0-9a-f]{32}", rid)


async def test_without_api_tokens_an_authorization_header_is_ignored(tmp_path: Path) -> None:
    open_server = Settings(queue_backend="memory", export_dir=tmp_path)
    async with checked_client(open_server) as client:
        for headers in ({}, bearer(WRONG), {"Authorization": "Basic Zm9vOmJhcg=="}):
            created = await client.post(
                "/workflow", content=b'{"data": {"a": 1}}', headers={**headers, **JSON}
            )
            assert created.status_code == 201
        assert (await client.get("/metrics", headers=bearer(WRONG))).status_code == 200


# --- schemathesis, authenticated ----------------------------------------------------

# test_schemathesis.py fuzzes a server without API_TOKENS: every rule but the token is
# tested there, at length, and because the document's `security` allows `{}` (no
# credentials) schemathesis sends none. This small run fuzzes a server with API_TOKENS,
# every request carrying the right token, on the workflow and queue operations (the
# public ones ignore tokens): with the bearer middleware in the stack, answers must be
# the documented ones all the same. The 401s are tested above, request by request.
authenticated_schema = schemathesis.openapi.from_path(OPENAPI_PATH).include(
    tag=["workflows", "queue"]
)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("exports")


@authenticated_schema.parametrize()
@hypothesis_settings(max_examples=SCHEMATHESIS_EXAMPLES, deadline=None)
def test_with_api_tokens_and_the_token_every_operation_answers_as_documented(
    case: schemathesis.Case[Any], export_dir: Path
) -> None:
    shorten_wait(case)
    settings = Settings(queue_backend="memory", export_dir=export_dir, api_tokens=(TOKEN,))
    case.call_and_validate(app=create_app(Container(settings=settings)), headers=bearer(TOKEN))
