"""RabbitMQ adapters: workflow uuids on a durable quorum queue, fed by the outbox relay.

`connection`: one AMQP connection driven by pika's asyncio adapter on the running event
loop, its requests pipelined over several channels; `lanes`: those channels and the
requests sent on them; `link`: opening the connection and its lanes, dropping it.
`broker`: the queue and its dead-letter queue (publish with batched publisher confirms,
basic.get, ack), a `Delivery` each message taken; `confirms`: the publisher confirms;
`declaration`: declaring the queues, used as they are when they exist with other
arguments; `prefetch`: the prefetching consumer, its messages held ahead of the consume
calls. `queue`: the workflow queue port on top of the broker, the repository staying the
truth. `peek`: a queue's depth read without declaring it, for `workflows stats`.
"""

from workflows.adapters.rabbitmq.broker import RabbitMqBroker
from workflows.adapters.rabbitmq.delivery import Delivery
from workflows.adapters.rabbitmq.queue import RabbitMqQueue

__all__ = ["Delivery", "RabbitMqBroker", "RabbitMqQueue"]
