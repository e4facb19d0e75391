"""Declaring the queues: a durable quorum queue and its dead-letter queue, each used as
it is when it exists with arguments other than the configured ones."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

import pika

from workflows.adapters.rabbitmq.lanes import Lane, Ready, Refusal

log = logging.getLogger(__name__)


def queue_arguments(
    dead_letter_queue: str, arguments: Mapping[str, object] | None
) -> dict[str, object]:
    """The queue's arguments: dead-lettering to `dead_letter_queue`, the extra `arguments`
    (`x-delivery-limit`...), a quorum queue whatever they say."""
    return {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead_letter_queue,
        **(arguments or {}),
        "x-queue-type": "quorum",
    }


def declare_queues(
    lane: Lane, queue: str, dead_letter_queue: str, arguments: Mapping[str, object], done: Ready
) -> None:
    """Declare the dead-letter queue, then `queue` with `arguments`, then call `done`."""
    declare_queue(
        lane,
        dead_letter_queue,
        {"x-queue-type": "quorum"},
        then=lambda: declare_queue(lane, queue, arguments, then=done),
    )


def declare_queue(lane: Lane, name: str, arguments: Mapping[str, object], *, then: Ready) -> None:
    """Declare queue `name`, then call `then`.

    RabbitMQ fixes a queue's arguments when it first declares it, and refuses a
    declare with other ones (406 PRECONDITION_FAILED, closing the channel): say
    MAX_DELIVERY_ATTEMPTS changed since, or something else made a queue of that name.
    Then use the queue as it is, on a new channel: a delivery limit other than the
    configured one is better than a service that cannot publish or consume at all.
    """

    def declared(_frame: Any) -> None:
        lane.refusal = None
        then()

    def keep_existing(reply_text: str) -> None:
        log.warning(
            "rabbitmq queue %r exists with arguments other than the configured %r (%s): "
            "using it as it is, its arguments kept. %s",
            name,
            dict(arguments),
            reply_text,
            _how_to_change(name, arguments),
        )
        lane.channel.queue_declare(name, passive=True, callback=lambda _: then())

    lane.refusal = Refusal(pika.spec.PRECONDITION_FAILED, keep_existing)
    lane.channel.queue_declare(name, durable=True, arguments=arguments, callback=declared)


def _how_to_change(queue: str, arguments: Mapping[str, object]) -> str:
    """The operator's ways to change the arguments of an existing queue."""
    delete = (
        "To change any of them, delete the queue once it is empty and restart the service, "
        "which declares it anew with the configured ones."
    )
    limit = arguments.get("x-delivery-limit")
    if limit is None:
        return delete
    policy = json.dumps({"delivery-limit": limit})
    return (
        "A policy can lower its delivery limit (a quorum queue applies the lower of the "
        f"policy's and its own): rabbitmqctl set_policy {queue}-limit '^{re.escape(queue)}$' "
        f"'{policy}' --apply-to queues. {delete}"
    )
