"""RabbitMQ adapters: workflow uuids on a durable quorum queue, fed by the outbox relay.

`connection`: one AMQP connection driven by pika's asyncio adapter on the running event
loop, its requests pipelined over several channels. `broker`: the queue and its
dead-letter queue (publish with batched publisher confirms, basic.get, ack). `queue`: the
workflow queue port on top of the broker, the repository staying the truth.
"""

from workflows.adapters.rabbitmq.broker import Delivery, RabbitMqBroker
from workflows.adapters.rabbitmq.queue import RabbitMqQueue

__all__ = ["Delivery", "RabbitMqBroker", "RabbitMqQueue"]
