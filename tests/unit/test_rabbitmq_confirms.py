"""Publisher confirms, batch by batch, from the frames the broker sends (no broker here)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pika
from pika.frame import Method

from workflows.adapters.rabbitmq.confirms import Confirms
from workflows.adapters.rabbitmq.connection import AmqpConnection
from workflows.adapters.rabbitmq.lanes import Lane, Request


class FakeChannel:
    channel_number = 1

    def __init__(self) -> None:
        self.published: list[bytes] = []

    def basic_publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: pika.BasicProperties,
        mandatory: bool = False,
    ) -> None:
        assert mandatory, "an unroutable message must come back, not vanish"
        assert properties.delivery_mode == 2, "persistent"
        self.published.append(body)


class FakeConnection(AmqpConnection):
    def __init__(self) -> None:
        super().__init__(pika.ConnectionParameters(), lanes=1, setup=_unused, timeout=1.0)
        self.reasons: list[str] = []

    def broken(self, reason: str) -> None:
        self.reasons.append(reason)


def _unused(lane: Lane, ready: Any) -> None:
    raise AssertionError("never connects")


def ack(tag: int, *, multiple: bool = False) -> Method:
    return Method(1, pika.spec.Basic.Ack(delivery_tag=tag, multiple=multiple))


def nack(tag: int) -> Method:
    return Method(1, pika.spec.Basic.Nack(delivery_tag=tag, multiple=False))


class Batches:
    def __init__(self, queue_gone: Callable[[str], None] | None = None) -> None:
        self.connection = FakeConnection()
        self.channel = FakeChannel()
        self.confirms = Confirms(Lane(self.channel), self.connection, queue_gone)
        self.requests: list[Request[None]] = []

    def publish(self, size: int) -> Request[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        request: Request[None] = Request(
            self.connection, _never_run, future, exclusive=False, on_orphan=None
        )
        self.confirms.publish("q", [b"m"] * size, request)
        self.requests.append(request)
        return request

    def confirmed(self) -> list[bool]:
        return [request.future.done() for request in self.requests]


def _never_run(lane: Lane, request: Request[None]) -> None:
    raise AssertionError("sent by the test itself")


async def test_a_batch_is_confirmed_once_every_message_of_it_is() -> None:
    batches = Batches()
    batches.publish(3)  # tags 1-3
    batches.publish(2)  # tags 4-5
    assert len(batches.channel.published) == 5  # all on the wire before any confirm
    batches.confirms.on_confirm(ack(2, multiple=True))
    assert batches.confirmed() == [False, False]
    batches.confirms.on_confirm(ack(4, multiple=True))
    assert batches.confirmed() == [True, False]
    batches.confirms.on_confirm(ack(5))
    assert batches.confirmed() == [True, True]
    assert batches.connection.reasons == []


async def test_single_acks_out_of_order_confirm_a_batch_only_when_no_gap_is_left() -> None:
    batches = Batches()
    batches.publish(3)
    for tag in (3, 1):
        batches.confirms.on_confirm(ack(tag))
    assert batches.confirmed() == [False]
    batches.confirms.on_confirm(ack(2))
    assert batches.confirmed() == [True]


async def test_a_nack_or_a_return_drops_the_connection_and_confirms_nothing() -> None:
    batches = Batches()
    batches.publish(2)
    batches.confirms.on_confirm(nack(1))
    batches.confirms.on_return(None, pika.spec.Basic.Return(reply_text="NO_ROUTE"), None, b"x")
    assert batches.confirmed() == [False]  # the connection retries it, or fails it
    assert len(batches.connection.reasons) == 2
    assert "nacked" in batches.connection.reasons[0]
    assert "NO_ROUTE" in batches.connection.reasons[1]


async def test_a_return_says_the_queue_is_gone_and_a_nack_does_not() -> None:
    """A returned message found no queue: the broker renews its other connections too
    (RabbitMqBroker._queue_gone), whose channels may still know the deleted queue."""
    gone: list[str] = []
    batches = Batches(queue_gone=gone.append)
    batches.publish(2)
    batches.confirms.on_confirm(nack(1))
    assert gone == []
    batches.confirms.on_return(None, pika.spec.Basic.Return(reply_text="NO_ROUTE"), None, b"x")
    assert len(gone) == 1
    assert "NO_ROUTE" in gone[0]
