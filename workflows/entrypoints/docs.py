"""The API contract, served: openapi.yaml as written, the same as JSON, and Swagger UI.

Swagger UI's files are vendored in static/swagger-ui (its README says which version and
how to update it) and served from here, so /docs works with no network beyond this
service. Files are read once per process, on first use, not at import.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import yaml
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

HERE = Path(__file__).parent
OPENAPI_PATH = HERE / "openapi.yaml"
STATIC = HERE / "static"
ASSETS: dict[str, tuple[Path, str]] = {
    "swagger-ui.css": (STATIC / "swagger-ui" / "swagger-ui.css", "text/css"),
    "swagger-ui-bundle.js": (STATIC / "swagger-ui" / "swagger-ui-bundle.js", "text/javascript"),
    "favicon-32x32.png": (STATIC / "swagger-ui" / "favicon-32x32.png", "image/png"),
    "docs.js": (STATIC / "docs.js", "text/javascript"),
}
# The browser enforces what the tests check: nothing is loaded from another origin.
# Swagger UI sets style attributes, hence 'unsafe-inline' for styles (not for scripts).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>Workflows API</title>
  <link rel="stylesheet" href="/docs/assets/swagger-ui.css">
  <link rel="icon" type="image/png" href="/docs/assets/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/assets/swagger-ui-bundle.js"></script>
  <script src="/docs/assets/docs.js"></script>
</body>
</html>
"""


@functools.cache
def openapi_document(path: Path = OPENAPI_PATH) -> tuple[bytes, bytes]:
    """The document as written (YAML) and as JSON.

    `json.dumps` (not orjson) so that a value YAML would turn into something JSON has
    not (an unquoted date becomes a datetime) fails here instead of being served.
    """
    written = path.read_bytes()
    as_json = json.dumps(yaml.safe_load(written), ensure_ascii=False, separators=(",", ":"))
    return written, as_json.encode()


@functools.cache
def _asset(name: str) -> bytes:
    return ASSETS[name][0].read_bytes()


async def openapi_yaml(request: Request) -> Response:
    return Response(openapi_document()[0], media_type="application/yaml")


async def openapi_json(request: Request) -> Response:
    return Response(openapi_document()[1], media_type="application/json")


async def docs_page(request: Request) -> Response:
    return HTMLResponse(DOCS_PAGE, headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})


async def docs_asset(request: Request) -> Response:
    name = request.path_params["asset"]
    if name not in ASSETS:
        raise HTTPException(404)
    return Response(_asset(name), media_type=ASSETS[name][1])


def docs_routes() -> list[BaseRoute]:
    return [
        Route("/openapi.yaml", openapi_yaml, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", docs_page, methods=["GET"]),
        Route("/docs/assets/{asset}", docs_asset, methods=["GET"]),
    ]
