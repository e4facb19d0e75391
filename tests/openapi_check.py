"""Is this response one the OpenAPI document describes? Status, media type, headers, body.

`assert_conforms(response)` finds the operation for the request's method and path in
workflows/entrypoints/openapi.yaml and checks the response against it: the status is
documented, so is the media type (and text comes as UTF-8), required headers are present
and every documented header matches its schema, and the body matches its schema (JSON
Schema 2020-12, the dialect of OpenAPI 3.1, with the document's `$ref`s resolved). What
the document says in prose is checked too: a path it does not list answers its
`NotFound` response; a method a path does not list answers its `MethodNotAllowed`
response, with `Allow` naming exactly the documented methods.

`check_response` does the same as an httpx response event hook, so that every response
a test client receives is checked.
"""

from __future__ import annotations

import functools
import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from workflows.entrypoints.docs import OPENAPI_PATH

Node = dict[str, Any]
BASE = "urn:workflows:openapi"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
FORMATS = jsonschema.Draft202012Validator.FORMAT_CHECKER


class Document:
    """The OpenAPI document: its paths as patterns, its `$ref`s resolvable."""

    def __init__(self, path: Path) -> None:
        # References made absolute, so that a schema taken out of the document still
        # resolves "#/components/..." against the whole document, registered at BASE.
        self.root: Node = _absolute_refs(yaml.safe_load(path.read_text(encoding="utf-8")))
        resource = Resource.from_contents(self.root, default_specification=DRAFT202012)
        self.registry: Registry[Any] = Registry().with_resource(BASE, resource)
        self.paths = sorted(
            ((_pattern(template), template) for template in self.root["paths"]),
            key=lambda entry: (entry[1].count("{"), entry[1]),  # literal segments win
        )

    def deref(self, node: Node) -> Node:
        while "$ref" in node:
            pointer = unquote(node["$ref"].removeprefix(BASE + "#"))
            node = self.root
            for part in pointer.lstrip("/").split("/"):
                node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def component(self, kind: str, name: str) -> Node:
        return self.deref(self.root["components"][kind][name])

    def path_item(self, path: str) -> tuple[str, Node] | None:
        for pattern, template in self.paths:
            if pattern.fullmatch(path):
                return template, self.deref(self.root["paths"][template])
        return None

    def validate(self, instance: Any, schema: Node, where: str) -> None:
        validator = jsonschema.Draft202012Validator(
            schema, registry=self.registry, format_checker=FORMATS
        )
        errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
        if errors:
            described = "\n".join(
                f"  at /{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5]
            )
            raise AssertionError(f"{where} does not match its schema:\n{described}")


@functools.cache
def document() -> Document:
    return Document(OPENAPI_PATH)


def assert_conforms(response: httpx.Response) -> None:
    """Fail, saying why, unless the document describes this response to this request."""
    doc = document()
    method = response.request.method.lower()
    # Decoded as the app decodes it: an encoded slash (%2F) stays, data within its segment.
    raw = response.request.url.raw_path.partition(b"?")[0].decode("ascii")
    path = unquote(raw.replace("%2F", "%252F").replace("%2f", "%252f"))
    label = f"{response.request.method} {path} → {response.status_code}"
    found = doc.path_item(path)
    if found is None:
        assert response.status_code == 404, f"{label}: the document has no path {path}"
        _check(doc, response, doc.component("responses", "NotFound"), label)
        return
    template, item = found
    documented = {m for m in METHODS if m in item}
    operation = item.get("get" if method == "head" else method)
    if method == "head" and operation is not None and operation.get("x-no-head"):
        operation = None  # a GET that changes something: no HEAD
    if operation is None:
        assert response.status_code == 405, f"{label}: {template} documents {sorted(documented)}"
        allow = response.headers.get("allow", "")
        allowed = {m.strip().lower() for m in allow.split(",") if m.strip()} - {"head"}
        assert allowed == documented, f"{label}: Allow says {allow!r}, the document {documented}"
        not_allowed = doc.component("responses", "MethodNotAllowed")
        _check(doc, response, not_allowed, label, with_body=method != "head")
        return
    responses = operation["responses"]
    status = str(response.status_code)
    key = next((k for k in (status, f"{status[0]}XX", "default") if k in responses), None)
    assert key is not None, (
        f"{label}: status {status} is not documented for {method.upper()} {template} "
        f"(documented: {', '.join(responses)})\n{response.text[:500]}"
    )
    _check(doc, response, doc.deref(responses[key]), label, with_body=method != "head")


async def check_response(response: httpx.Response) -> None:
    """The httpx (async) response event hook: read the body, then `assert_conforms`."""
    await response.aread()
    assert_conforms(response)


def _check(
    doc: Document, response: httpx.Response, spec: Node, label: str, with_body: bool = True
) -> None:
    for name, header in spec.get("headers", {}).items():
        header = doc.deref(header)
        value = response.headers.get(name)
        if value is None:
            assert not header.get("required"), f"{label}: required header {name} is missing"
        else:
            schema = header["schema"]
            doc.validate(_header_value(value, schema), schema, f"{label}: header {name}")
    content = spec.get("content")
    if not content:
        body = response.text[:200]
        assert response.content == b"", f"{label}: the document says no body, got {body!r}"
        return
    content_type = response.headers.get("content-type", "")
    media, _, parameters = content_type.partition(";")
    media = media.strip().lower()
    assert media in content, (
        f"{label}: Content-Type {content_type!r} is not documented ({', '.join(content)} are)"
    )
    if media.startswith("text/"):
        assert "charset=utf-8" in parameters.replace(" ", "").lower().split(";"), (
            f"{label}: text must be sent with charset=utf-8, not as {content_type!r}"
        )
    schema = content[media].get("schema")
    if with_body and schema is not None:
        body = _decode(response.content, media, label)
        if body is not BINARY:
            doc.validate(body, schema, f"{label}: the body")


BINARY = object()


def _decode(content: bytes, media: str, label: str) -> Any:
    try:
        if media == "application/json" or media.endswith("+json"):
            return json.loads(content, parse_float=Decimal, parse_int=_integer)
        if media == "application/yaml":
            return yaml.safe_load(content)
        if media.startswith("text/"):
            return content.decode("utf-8")
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise AssertionError(f"{label}: the body is not {media}: {error}") from None
    assert content, f"{label}: the body is empty"
    return BINARY


def _integer(text: str) -> int | Decimal:
    """Python refuses to read integers of more than 4300 digits; JSON has no such limit."""
    return int(text) if len(text) < 4300 else Decimal(text)


def _header_value(value: str, schema: Node) -> Any:
    if schema.get("type") == "integer" and re.fullmatch(r"-?[0-9]+", value):
        return int(value)
    return value


def _absolute_refs(node: Any) -> Any:
    if isinstance(node, list):
        return [_absolute_refs(item) for item in node]
    if not isinstance(node, dict):
        return node
    absolute = {key: _absolute_refs(value) for key, value in node.items()}
    reference = node.get("$ref")
    if isinstance(reference, str) and reference.startswith("#"):
        absolute["$ref"] = BASE + reference
    return absolute


def _pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]+\})", template)
    return re.compile("".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts))
