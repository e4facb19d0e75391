"""/docs in a real browser: headless Chromium renders Swagger UI from `workflows serve`,
with every host but 127.0.0.1 unresolvable, so the page can only have used the service.

.ci/run installs Debian's chromium; elsewhere, without one, this test is skipped (not in
CI, where CI=true makes a missing browser a failure)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
import yaml

from tests.support.processes import served
from workflows.entrypoints.docs import OPENAPI_PATH

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None and os.environ.get("CI") != "true",
    reason="no chromium on this machine (apt-get install chromium); CI installs it",
)


def rendered(url: str, profile: Path) -> str:
    """The page's DOM once its scripts have run (and fetched what they fetch)."""
    assert CHROMIUM is not None, "CI must have chromium: .ci/run installs it"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--virtual-time-budget=20000",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def path_item(document: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    """A path item, its `$ref` followed (the /v1 aliases are references: `#/paths/~1…`)."""
    while "$ref" in item:
        *_, escaped = unquote(item["$ref"]).split("/")  # a JSON pointer in a URI fragment
        item = document["paths"][escaped.replace("~1", "/").replace("~0", "~")]
    return item


def test_the_docs_page_renders_every_operation_of_the_document(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "RABBITMQ_URL")}
    env |= {
        "QUEUE_BACKEND": "memory",
        "EXPORT_DIR": str(tmp_path / "exports"),
        "TMPDIR": str(tmp_path),
        "API_TOKENS": "",
    }
    with served(env, tmp_path, "docs") as url:
        dom = rendered(f"{url}/docs", tmp_path / "chromium")
        document = httpx.get(f"{url}/openapi.json", timeout=10).json()  # what the page loads
    assert set(yaml.safe_load(OPENAPI_PATH.read_text())["paths"]) <= set(document["paths"])
    expected = {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in path_item(document, item)
        if method in {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
    }
    shown = set(
        re.findall(r'opblock-summary-method">(\w+)</span>.*?data-path="([^"]+)"', dom, flags=re.S)
    )
    assert shown == expected, dom[:3000]
    assert document["info"]["title"] in dom
    assert "Failed to load API definition" not in dom
