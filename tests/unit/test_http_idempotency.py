"""POST with an Idempotency-Key: one request, however often it is sent."""

from __future__ import annotations

import httpx
import pytest

BODY = {"data": {"order": 42}, "steps": ["bill"]}


async def test_repeated_key_and_body_answer_the_same_workflow_without_a_second_enqueue(
    client: httpx.AsyncClient,
) -> None:
    headers = {"Idempotency-Key": '"order-42"'}
    first = await client.post("/workflow", json=BODY, headers=headers)
    again = await client.post("/workflow", json=BODY, headers=headers)
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json() == first.json()
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert len((await client.get("/workflow")).json()) == 1
    assert (await client.get("/workflow/consume")).status_code == 200
    assert (await client.get("/workflow/consume")).status_code == 204


async def test_replay_answers_the_workflow_as_it_is_now(client: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "order-43"}
    first = await client.post("/workflow", json=BODY, headers=headers)
    await client.get("/workflow/consume")
    again = await client.post("/workflow", json=BODY, headers=headers)
    assert again.json()["uuid"] == first.json()["uuid"]
    assert again.json()["status"] == "consumed"


async def test_same_key_with_another_body_is_422_and_stores_nothing(
    client: httpx.AsyncClient,
) -> None:
    headers = {"Idempotency-Key": "order-44"}
    await client.post("/workflow", json=BODY, headers=headers)
    other = await client.post("/workflow", json={"data": {"order": 45}}, headers=headers)
    assert other.status_code == 422
    assert other.headers["content-type"] == "application/problem+json"
    assert other.json()["type"] == "/problems/idempotency-key-reused"
    assert other.json()["errors"][0]["pointer"] == "/header/Idempotency-Key"
    assert len((await client.get("/workflow")).json()) == 1


async def test_different_keys_are_different_requests(client: httpx.AsyncClient) -> None:
    a = await client.post("/workflow", json=BODY, headers={"Idempotency-Key": "a"})
    b = await client.post("/workflow", json=BODY, headers={"Idempotency-Key": "b"})
    assert a.json()["uuid"] != b.json()["uuid"]


@pytest.mark.parametrize("key", ["", '""', "x" * 256, "caf\u00e9", "tab\there"])
async def test_malformed_key_is_422_and_stores_nothing(client: httpx.AsyncClient, key: str) -> None:
    response = await client.post(
        "/workflow",
        content=b'{"data": {"a": 1}}',
        headers=[(b"Idempotency-Key", key.encode("utf-8")), (b"Content-Type", b"application/json")],
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["pointer"] == "/header/Idempotency-Key"
    assert (await client.get("/workflow")).json() == []


async def test_a_key_sent_twice_is_422_and_stores_nothing(client: httpx.AsyncClient) -> None:
    """Which of two keys would name the request? Neither: as a repeated query parameter."""
    for keys in (["k", "k"], ["k", "other"]):
        response = await client.post(
            "/workflow",
            content=b'{"data": {"a": 1}}',
            headers=[("Idempotency-Key", key) for key in keys]
            + [("Content-Type", "application/json")],
        )
        assert response.status_code == 422
        problem = response.json()
        assert problem["errors"] == [
            {"pointer": "/header/Idempotency-Key", "message": "is given more than once"}
        ]
    assert (await client.get("/workflow")).json() == []
    once = await client.post("/workflow", json={"data": {"a": 1}}, headers={"Idempotency-Key": "k"})
    assert once.status_code == 201  # the refused requests did not use the key up
