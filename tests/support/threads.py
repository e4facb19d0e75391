"""The threads the RabbitMQ adapter starts: one per AMQP connection, named `rabbitmq-…`."""

from __future__ import annotations

import threading


def broker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("rabbitmq-")]
