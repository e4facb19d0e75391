"""Bearer tokens, protected mode, security headers and CORS: pure ASGI middleware."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from workflows.entrypoints.config import Settings
from workflows.entrypoints.problems import Problem

PUBLIC_PATHS = frozenset(
    {"/healthz", "/readyz", "/version", "/v1/version", "/docs", "/openapi.json", "/openapi.yaml"}
)
PUBLIC_PREFIXES = ("/docs/",)
# For API responses (JSON, CSV): nothing may be loaded, framed or submitted. The /docs page
# sets a CSP of its own (docs.py), which this one does not replace.
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", API_CSP.encode()),
)
NO_STORE = ((b"cache-control", b"no-store"),)
API_HEADERS = HEADERS + NO_STORE
"""What every API response (JSON, CSV, problems) gets."""
CACHEABLE_PREFIXES = ("/docs/assets/",)


def access_control(settings: Settings) -> list[Middleware]:
    """CORS when configured, then bearer tokens when configured: CORS first, because a
    preflight carries no credentials and must be answered all the same."""
    stack: list[Middleware] = []
    if settings.cors_origins:
        stack.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST", "PATCH"],
                allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Request-ID"],
                expose_headers=[
                    "Location",
                    "Link",
                    "Retry-After",
                    "X-Request-ID",
                    "X-Workflow-UUID",
                ],
                max_age=600,
            )
        )
    if settings.api_tokens:
        public = PUBLIC_PATHS | ({"/metrics"} if settings.metrics_public else set())
        stack.append(Middleware(BearerAuthMiddleware, tokens=settings.api_tokens, public=public))
    return stack


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = with_defaults(path, message.get("headers", ()))
            await send(message)

        await self.app(scope, receive, send_with_headers)


def with_defaults(path: str, headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """A response's raw headers (lower-case names, as Starlette sends them) followed by the
    security headers it does not set itself: its own value wins, e.g. the /docs page's
    Content-Security-Policy."""
    defaults = HEADERS if path.startswith(CACHEABLE_PREFIXES) else API_HEADERS
    headers = list(headers)
    present = {name.lower() for name, _ in headers}
    headers.extend(h for h in defaults if h[0] not in present)
    return headers


class BearerAuthMiddleware:
    """Every path but the public ones needs `Authorization: Bearer <one of the tokens>`.

    Deny by default: a route added later is protected without anyone remembering to.
    """

    def __init__(self, app: ASGIApp, tokens: tuple[str, ...], public: frozenset[str]) -> None:
        self.app = app
        self.tokens = [token.encode() for token in tokens]
        self.public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        problem = authorization_problem(self.tokens, authorizations(scope))
        if problem is None:
            await self.app(scope, receive, send)
            return
        await problem.response()(scope, receive, send)

    def is_public(self, path: str) -> bool:
        return path in self.public or path.startswith(PUBLIC_PREFIXES)


def accepts(tokens: list[bytes], authorization: str) -> bool:
    """Whether an Authorization header value is `Bearer <one of tokens>`."""
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    given = credentials.strip().encode("utf-8", "surrogateescape")
    # Compare with every token, whatever matches: the time taken says nothing about
    # which token (or how much of one) is right.
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(given, token)
    return matched


def authorizations(scope: Scope) -> list[str]:
    """The values of every Authorization line of a request, in order."""
    return [value.decode("latin-1") for name, value in scope["headers"] if name == b"authorization"]


def authorization_problem(tokens: list[bytes], sent: list[str]) -> Problem | None:
    """The refusal of a request to a protected path (401), or None when it may pass.
    `sent` is every Authorization line of the request: more than one is a 400 (RFC 6750's
    invalid_request) whatever they hold: none is the request's credentials more than another."""
    if not sent:
        return unauthorized("send 'Authorization: Bearer <token>' (one of API_TOKENS)")
    if len(sent) > 1:
        return Problem(
            400,
            f"more than one Authorization header ({len(sent)}); send one, "
            f"'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": challenge("invalid_request")},
            slug="invalid-request",
            title="Bad Request",
        )
    if not accepts(tokens, sent[0]):
        return unauthorized("the bearer token is not valid", error="invalid_token")
    return None


def unauthorized(detail: str, error: str | None = None) -> Problem:
    return Problem(401, detail, headers={"WWW-Authenticate": challenge(error)})


def challenge(error: str | None) -> str:
    return 'Bearer realm="workflows"' + (f', error="{error}"' if error else "")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost`; anything else (0.0.0.0, ::, a name) is not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def protected_mode_refusal(host: str, settings: Settings) -> str | None:
    """Why `serve` must not listen on `host`; None when it may."""
    if settings.api_tokens or settings.allow_unauthenticated or is_loopback(host):
        return None
    return (
        f"refusing to listen on {host}: no API_TOKENS are set, so anyone who can reach this "
        f"address could read and consume every workflow. Either set API_TOKENS "
        f"(comma-separated; clients send 'Authorization: Bearer <token>'), listen on a "
        f"loopback address (--host 127.0.0.1), or, if something in front of this service "
        f"authenticates requests, set ALLOW_UNAUTHENTICATED=true."
    )
