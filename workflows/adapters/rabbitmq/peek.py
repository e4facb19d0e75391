"""A queue's depth read without declaring anything: for `workflows stats`, which must not
create a queue that a mistyped RABBITMQ_QUEUE names, nor fix its arguments."""

from __future__ import annotations

import pika
import pika.exceptions

from workflows.domain.errors import DependencyUnavailable

NOT_FOUND = 404


class QueueMissing(LookupError):
    """The broker has no queue of that name: nothing has declared it."""


def queue_depth(url: str, queue: str, *, timeout: float) -> int:
    """Messages ready in `queue` (a passive declare, on a connection of its own; blocking).
    QueueMissing when there is no such queue, DependencyUnavailable when the broker cannot
    be reached."""
    parameters = pika.URLParameters(url)
    parameters.connection_attempts = 1
    parameters.socket_timeout = timeout
    parameters.stack_timeout = timeout
    parameters.blocked_connection_timeout = timeout
    try:
        connection = pika.BlockingConnection(parameters)
    except pika.exceptions.AMQPError as error:
        raise DependencyUnavailable("rabbitmq", repr(error)) from None
    try:
        frame = connection.channel().queue_declare(queue, passive=True)
        return int(frame.method.message_count)
    except pika.exceptions.ChannelClosedByBroker as error:
        if error.reply_code == NOT_FOUND:
            raise QueueMissing(queue) from None
        raise DependencyUnavailable("rabbitmq", repr(error)) from None
    except pika.exceptions.AMQPError as error:
        raise DependencyUnavailable("rabbitmq", repr(error)) from None
    finally:
        if connection.is_open:
            connection.close()
