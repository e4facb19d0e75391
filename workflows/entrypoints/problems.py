"""RFC 9457 problem details: the one shape every error response takes."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from workflows.entrypoints.logs import printable

PROBLEM_MEDIA_TYPE = "application/problem+json"

TITLES = {
    400: ("malformed-json", "Malformed JSON"),
    401: ("unauthorized", "Unauthorized"),
    404: ("not-found", "Not Found"),
    405: ("method-not-allowed", "Method Not Allowed"),
    406: ("not-acceptable", "Not Acceptable"),
    413: ("payload-too-large", "Payload Too Large"),
    415: ("unsupported-media-type", "Unsupported Media Type"),
    422: ("validation-failed", "Validation Failed"),
    500: ("internal-error", "Internal Server Error"),
    503: ("service-unavailable", "Service Unavailable"),
}


class Problem(Exception):
    """An error answered as a problem document; raise it anywhere at the edge."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
        slug: str | None = None,
        title: str | None = None,
    ) -> None:
        super().__init__(detail)
        default_slug, default_title = TITLES.get(status, ("error", "Error"))
        self.status = status
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}
        self.slug = slug or default_slug
        self.title = title or default_title

    def response(self) -> Response:
        body: dict[str, Any] = {
            "type": f"/problems/{self.slug}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.errors is not None:
            body["errors"] = self.errors
        try:
            content = orjson.dumps(body)
        except orjson.JSONEncodeError:  # an unpaired surrogate in a key the detail names
            content = orjson.dumps(printable(body))
        return Response(
            content,
            status_code=self.status,
            headers=self.headers,
            media_type=PROBLEM_MEDIA_TYPE,
        )


def invalid(pointer: str, message: str) -> Problem:
    """A 422 for one bad value, located by its JSON pointer."""
    return Problem(422, f"{pointer or 'the body'}: {message}", errors=[error(pointer, message)])


def error(pointer: str, message: str) -> dict[str, str]:
    return {"pointer": pointer, "message": message}
