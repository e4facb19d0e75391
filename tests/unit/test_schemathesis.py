"""schemathesis drives the app (in memory) from openapi.yaml and checks every answer.

Each operation gets EXAMPLES (50) generated requests, valid and invalid, besides the
document's examples and the coverage phase's boundary values; the stateful test chains
calls along the document's links (create → get, patch, csv, consume → get, replay) in
STATEFUL_RUNS (100) sequences of up to STATEFUL_STEPS (10) calls. About 3,000 requests,
sized to keep this file near 20 seconds of the unit run; a one-off run of 400 examples
and 400 sequences of 20 found nothing more.

schemathesis' default checks judge every answer: no 5xx, documented status codes,
content types and headers, bodies matching their schemas, invalid input rejected, valid
input accepted, 405 with `Allow` for undocumented methods. Two adjustments, each
explained where it is made: `shorten_wait`, and the stateful test's exact check of
`Idempotency-Key` reuse in place of "valid input accepted" for that one answer.

The app runs without API_TOKENS, as a server on a loopback address does: every rule but
the bearer token is tested here, and as the document's `security` allows `{}` (no
credentials), schemathesis sends none. test_openapi_security.py tests the 401s request
by request, and runs a small schemathesis pass with API_TOKENS set and the token sent.

Every example and every sequence starts on an empty app: a failure then replays the
same way when Hypothesis shrinks it, and an Idempotency-Key generated twice cannot make
one example's valid request depend on another's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import settings
from schemathesis.core.transport import Response
from schemathesis.specs.openapi.checks import positive_data_acceptance
from starlette.applications import Starlette

from workflows.entrypoints.config import Settings
from workflows.entrypoints.container import Container
from workflows.entrypoints.docs import OPENAPI_PATH
from workflows.entrypoints.http import create_app

EXAMPLES = 50
STATEFUL_RUNS = 100
STATEFUL_STEPS = 10

# From the file rather than the app's /openapi.json: schemathesis' fixture-based loader
# fails on pytest 9 (it sets `request.node._nodeid`). test_openapi.py proves the app
# serves this file.
schema = schemathesis.openapi.from_path(OPENAPI_PATH)
VALID_WAIT = re.compile(
    schema.raw_schema["paths"]["/workflow/consume"]["get"]["parameters"][0]["schema"]["pattern"]
)
SHORT_WAIT = "0.01"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("exports")


def empty_app(export_dir: Path) -> Starlette:
    return create_app(Container(settings=Settings(queue_backend="memory", export_dir=export_dir)))


def shorten_wait(case: schemathesis.Case[Any]) -> None:
    """A valid consume `?wait=` becomes 0.01 s; invalid ones are sent as generated.

    Waits are real time: on an empty queue every generated wait of up to 20 s would be
    slept in full, making this run last many minutes. A short wait still takes the
    waiting path (look, wait, look again, 204) and a valid value stays valid, so every
    check applies as before; waiting itself is tested in test_long_poll.py.
    """
    wait = (case.query or {}).get("wait")
    if isinstance(wait, str) and VALID_WAIT.fullmatch(wait) and float(wait) > float(SHORT_WAIT):
        case.query["wait"] = SHORT_WAIT


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None)
def test_every_operation_answers_as_documented(
    case: schemathesis.Case[Any], export_dir: Path
) -> None:
    shorten_wait(case)
    case.call_and_validate(app=empty_app(export_dir))


def test_sequences_of_operations_answer_as_documented(export_dir: Path) -> None:
    class Sequences(schema.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            self.app = empty_app(export_dir)
            self.requests_by_key: dict[str, str] = {}

        def before_call(self, case: schemathesis.Case[Any]) -> None:
            shorten_wait(case)

        def get_call_kwargs(self, case: schemathesis.Case[Any]) -> dict[str, object]:
            return {"app": self.app}

        def after_call(self, response: Response, case: schemathesis.Case[Any]) -> None:
            super().after_call(response, case)
            key = idempotency_key(case)
            if key is not None and response.status_code == 201:
                self.requests_by_key.setdefault(key, request_named(case))

        def validate_response(
            self, response: Response, case: schemathesis.Case[Any], **kwargs: Any
        ) -> None:
            if not is_key_reused(response):
                super().validate_response(response, case, **kwargs)
                return
            # A valid POST refused because an earlier one in this sequence used its
            # Idempotency-Key for another body: the document's 422, not a valid request
            # rejected. Checked here exactly, and every other check still applies.
            key = idempotency_key(case)
            assert key in self.requests_by_key, f"{key!r} was never used before"
            assert self.requests_by_key[key] != request_named(case), "the same request"
            case.validate_response(
                response,
                excluded_checks=[positive_data_acceptance],
                transport_kwargs=kwargs or None,
                recorder=self.recorder,
            )

    Sequences.run(
        settings=settings(
            max_examples=STATEFUL_RUNS, stateful_step_count=STATEFUL_STEPS, deadline=None
        )
    )


def idempotency_key(case: schemathesis.Case[Any]) -> str | None:
    """The key as the server reads it: spaces around it and one pair of quotes dropped."""
    raw = case.headers.get("Idempotency-Key") if case.headers else None
    if not isinstance(raw, str):
        return None
    key = raw.strip(" \t")
    return key[1:-1] if len(key) >= 2 and key[0] == key[-1] == '"' else key


def request_named(case: schemathesis.Case[Any]) -> str:
    """What a key names: the workflow's data (key order and number spelling kept) and steps."""
    body = case.body if isinstance(case.body, dict) else {}
    return json.dumps([body.get("data"), body.get("steps", [])])


def is_key_reused(response: Response) -> bool:
    if response.status_code != 422:
        return False
    problem = json.loads(response.content)
    return isinstance(problem, dict) and problem.get("type") == "/problems/idempotency-key-reused"
