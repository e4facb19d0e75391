"""A message the broker handed out, unacked: to ack or requeue on its own channel."""

from __future__ import annotations

import attrs


@attrs.frozen
class Delivery:
    """A message taken with basic.get, or delivered to the prefetching consumer
    (`prefetched`), unacked. Its tag is only valid on the channel that delivered it
    (`lane` of that connection's `generation`); once that channel is gone the broker
    requeues it."""

    body: bytes
    tag: int
    generation: int
    lane: int
    prefetched: bool = False
