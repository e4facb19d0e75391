"""API tokens, protected mode, security headers and CORS."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware

from workflows.entrypoints import cli
from workflows.entrypoints.config import ConfigError, Settings
from workflows.entrypoints.container import Container
from workflows.entrypoints.docs import CONTENT_SECURITY_POLICY, docs_routes
from workflows.entrypoints.http import create_app
from workflows.entrypoints.security import (
    SecurityHeadersMiddleware,
    is_loopback,
    protected_mode_refusal,
)

TOKEN = "s3cret-token-0123456789abcdef"
OTHER_TOKEN = "another-token-0123456789abcdef"
JSON = {"Content-Type": "application/json"}
BODY = b'{"data": {"a": 1}}'
UUID = "019ac8f0-5c1e-7a3b-9c1d-2f3e4a5b6c7d"


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def client_for(settings: Settings) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(Container(settings=settings)))
    return httpx.AsyncClient(transport=transport, base_url="http://test")


@pytest.fixture
async def guarded(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with await client_for(attrs.evolve(settings, api_tokens=(TOKEN, OTHER_TOKEN))) as c:
        yield c


async def test_without_tokens_the_workflow_endpoints_are_open(client: httpx.AsyncClient) -> None:
    assert (await client.post("/workflow", content=BODY, headers=JSON)).status_code == 201


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/workflow"),
        ("GET", "/workflow"),
        ("GET", "/v1/workflow"),
        ("GET", "/workflow/consume"),
        ("POST", "/v1/workflow/consume"),
        ("GET", f"/workflow/{UUID}"),
        ("PATCH", f"/v1/workflow/{UUID}"),
        ("GET", f"/workflow/{UUID}/csv"),
        ("GET", "/no/such/path"),
    ],
)
async def test_with_tokens_a_request_without_one_is_a_401_problem(
    guarded: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await guarded.request(method, path, content=BODY, headers=JSON)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == "/problems/unauthorized"


async def test_a_refused_request_changes_nothing(guarded: httpx.AsyncClient) -> None:
    await guarded.post("/workflow", content=BODY, headers=JSON)
    assert (await guarded.get("/workflow", headers=bearer())).json() == []


@pytest.mark.parametrize(
    "authorization",
    [
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        "Bearer ",
        f"Basic {TOKEN}",
        TOKEN,
        f"Bearer {TOKEN} {TOKEN}",
        "Bearer ünïcode-token-0123456789".encode("latin-1"),
    ],
)
async def test_a_wrong_token_or_scheme_is_refused(
    guarded: httpx.AsyncClient, authorization: str | bytes
) -> None:
    value = authorization.encode() if isinstance(authorization, str) else authorization
    response = await guarded.get("/workflow", headers=[(b"Authorization", value)])
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


@pytest.mark.parametrize("authorization", [f"Bearer {TOKEN}", f"bearer {OTHER_TOKEN}"])
async def test_any_configured_token_is_accepted(
    guarded: httpx.AsyncClient, authorization: str
) -> None:
    headers = {"Authorization": authorization, **JSON}
    created = await guarded.post("/v1/workflow", content=BODY, headers=headers)
    assert created.status_code == 201
    consumed = await guarded.get("/workflow/consume", headers=headers)
    assert consumed.status_code == 200


def twice(first: str = TOKEN, second: str = TOKEN) -> list[tuple[str, str]]:
    """Two Authorization lines, and a JSON Content-Type."""
    lines = [("Authorization", f"Bearer {first}"), ("Authorization", f"Bearer {second}")]
    return [*lines, *JSON.items()]


async def test_two_authorization_headers_are_a_400_that_changes_nothing(
    guarded: httpx.AsyncClient,
) -> None:
    created = await guarded.post("/workflow", content=BODY, headers={**bearer(), **JSON})
    item = created.headers["location"]
    status = b'{"status": "consumed"}'
    refused = [
        await guarded.post("/workflow", content=BODY, headers=twice()),
        await guarded.post("/v1/workflow", content=BODY, headers=twice(OTHER_TOKEN, TOKEN)),
        await guarded.patch(item, content=status, headers=twice()),
        await guarded.get("/workflow/consume", headers=twice(TOKEN, "wrong")),
        await guarded.post("/workflow/consume", headers=twice()),
        await guarded.get("/no/such/path", headers=twice()),  # before routing, as the 401
    ]
    for response in refused:
        assert response.status_code == 400, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["type"] == "/problems/invalid-request"
        assert response.json()["detail"].startswith("more than one Authorization header")
        assert 'error="invalid_request"' in response.headers["www-authenticate"]
        assert_security_headers(response)
    listed = await guarded.get("/workflow", headers=bearer())
    assert listed.json() == [created.json()]


@pytest.mark.parametrize("path", ["/healthz", "/v1/version"])
async def test_two_authorization_headers_on_a_public_path_are_ignored(
    guarded: httpx.AsyncClient, path: str
) -> None:
    assert (await guarded.get(path, headers=twice(TOKEN, "wrong"))).status_code == 200


async def test_without_tokens_two_authorization_headers_are_ignored(
    client: httpx.AsyncClient,
) -> None:
    created = await client.post("/workflow", content=BODY, headers=twice(TOKEN, "wrong"))
    assert created.status_code == 201  # the hot route
    item = created.headers["location"]
    status = b'{"status": "consumed"}'
    patched = await client.patch(item, content=status, headers=twice("a", "b"))
    assert patched.status_code == 200  # a Starlette route
    assert (await client.get(f"{item}/csv", headers=twice())).status_code == 200


@pytest.mark.parametrize(
    "path",
    ["/healthz", "/readyz", "/version", "/v1/version", "/metrics", "/docs", "/openapi.json"],
)
async def test_health_version_docs_and_metrics_stay_public(
    guarded: httpx.AsyncClient, path: str
) -> None:
    assert (await guarded.get(path)).status_code != 401


async def test_metrics_need_a_token_when_not_public(settings: Settings) -> None:
    private = attrs.evolve(settings, api_tokens=(TOKEN,), metrics_public=False)
    async with await client_for(private) as client:
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers=bearer())).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/healthz", 200),
        ("GET", "/workflow", 200),
        ("POST", "/workflow", 201),
        ("GET", "/workflow/consume", 204),
        ("GET", f"/workflow/{UUID}", 404),
        ("DELETE", "/workflow", 405),
        ("GET", "/workflow?limit=0", 422),
        ("GET", "/metrics", 200),
    ],
)
async def test_every_response_carries_the_security_headers(
    client: httpx.AsyncClient, method: str, path: str, status: int
) -> None:
    response = await client.request(method, path, content=BODY, headers=JSON)
    assert response.status_code == status
    assert_security_headers(response)


async def test_a_401_carries_the_security_headers(guarded: httpx.AsyncClient) -> None:
    assert_security_headers(await guarded.get("/workflow"))


def assert_security_headers(response: httpx.Response) -> None:
    headers = response.headers
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["content-security-policy"].startswith("default-src 'none'")
    assert headers["cache-control"] == "no-store"


async def test_the_docs_page_keeps_its_own_csp_and_its_assets_may_be_cached() -> None:
    app = Starlette(routes=docs_routes(), middleware=[Middleware(SecurityHeadersMiddleware)])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        page = await client.get("/docs")
        assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert "script-src 'self'" in page.headers["content-security-policy"]
        asset = await client.get("/docs/assets/docs.js")
        assert asset.status_code == 200
        assert "cache-control" not in asset.headers
        assert asset.headers["x-content-type-options"] == "nosniff"


PREFLIGHT = {
    "Origin": "https://app.example.com",
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


async def test_cors_is_off_unless_configured(client: httpx.AsyncClient) -> None:
    preflight = await client.options("/workflow", headers=PREFLIGHT)
    assert "access-control-allow-origin" not in preflight.headers
    simple = await client.get("/workflow", headers={"Origin": "https://app.example.com"})
    assert "access-control-allow-origin" not in simple.headers


async def test_configured_cors_answers_preflights_without_a_token(settings: Settings) -> None:
    cors = attrs.evolve(settings, api_tokens=(TOKEN,), cors_origins=("https://app.example.com",))
    async with await client_for(cors) as client:
        preflight = await client.options("/workflow", headers=PREFLIGHT)
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        stranger = await client.options(
            "/workflow", headers={**PREFLIGHT, "Origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in stranger.headers
        simple = await client.get(
            "/workflow", headers={"Origin": "https://app.example.com", **bearer()}
        )
        assert simple.headers["access-control-allow-origin"] == "https://app.example.com"
        assert "x-request-id" in simple.headers["access-control-expose-headers"].lower()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("example.com", False),
        ("", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_protected_mode_refuses_a_public_address_without_tokens() -> None:
    reason = protected_mode_refusal("0.0.0.0", Settings())
    assert reason is not None
    assert "API_TOKENS" in reason
    assert "ALLOW_UNAUTHENTICATED=true" in reason


@pytest.mark.parametrize(
    ("host", "settings"),
    [
        ("127.0.0.1", Settings()),
        ("0.0.0.0", Settings(api_tokens=(TOKEN,))),
        ("0.0.0.0", Settings(allow_unauthenticated=True)),
    ],
)
def test_protected_mode_allows_loopback_tokens_or_an_explicit_opt_out(
    host: str, settings: Settings
) -> None:
    assert protected_mode_refusal(host, settings) is None


def test_serve_refuses_to_start_on_a_public_address_without_tokens(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    for name in ("API_TOKENS", "ALLOW_UNAUTHENTICATED", "HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QUEUE_BACKEND", "memory")
    assert cli.main(["serve", "--host", "0.0.0.0"]) == 2
    assert "refusing to listen on 0.0.0.0" in capsys.readouterr().err


def test_tokens_are_read_comma_separated() -> None:
    settings = Settings.from_env({"API_TOKENS": f" {TOKEN}, {OTHER_TOKEN} ,,"})
    assert settings.api_tokens == (TOKEN, OTHER_TOKEN)


@pytest.mark.parametrize("tokens", ["short", f"{TOKEN},has space in it 0123456789", "tök" * 8])
def test_a_malformed_token_is_refused_without_showing_it(tokens: str) -> None:
    with pytest.raises(ConfigError, match="API_TOKENS") as error:
        Settings.from_env({"API_TOKENS": tokens})
    assert "short" not in str(error.value)
    assert "space" not in str(error.value)


@pytest.mark.parametrize(
    "env",
    [
        {"ALLOW_UNAUTHENTICATED": "maybe"},
        {"METRICS_PUBLIC": "2"},
        {"CORS_ORIGINS": "app.example.com"},
        {"CORS_ORIGINS": "https://app.example.com/path"},
    ],
)
def test_bad_security_settings_are_refused_with_their_name(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=next(iter(env))):
        Settings.from_env(env)


def test_settings_never_show_tokens_or_passwords() -> None:
    settings = Settings.from_env(
        {
            "API_TOKENS": TOKEN,
            "DATABASE_URL": "postgresql://app:pg-password@db/app",
            "RABBITMQ_URL": "amqp://app:mq-password@mq/%2F",
        }
    )
    shown = repr(settings)
    assert TOKEN not in shown
    assert "pg-password" not in shown
    assert "mq-password" not in shown
