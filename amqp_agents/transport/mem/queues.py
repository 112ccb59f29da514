"""The in-memory broker's data: messages, queues (priority levels, TTL, length limit),
exchanges (bindings and a route cache), and the queue arguments compared on redeclaration.

Private to :mod:`amqp_agents.transport.mem`. Plain data with the few operations that
keep its invariants (a requeued message goes back to its place; only heads expire).
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

    from amqp_agents.models.envelope import Envelope, HeaderValue
    from amqp_agents.models.topology import QueueSpec
    from amqp_agents.transport.base import ExchangeKind
    from amqp_agents.transport.mem.consumer import Consumer
    from amqp_agents.transport.mem.transport import InMemoryTransport

__all__ = [
    "EQUIVALENCE_ARGS",
    "ROUTE_CACHE_SIZE",
    "Exchange",
    "Message",
    "Queue",
    "compared",
    "next_consumer",
]


@dataclass(slots=True)
class Message:
    """A message in a queue: the broker's copy of the envelope and where it stands."""

    envelope: Envelope
    priority: int
    expires_at: float | None
    seq: int = 0  # enqueue order in its queue: a requeue puts it back in its place
    redelivered: bool = False


ROUTE_CACHE_SIZE = 4096
"""Routing keys remembered per exchange before the cache starts over."""


def _seq(message: Message) -> int:
    """A message's place in its queue (the sort key of a requeue)."""
    return message.seq


EQUIVALENCE_ARGS = frozenset(
    {
        "x-dead-letter-exchange",
        "x-dead-letter-routing-key",
        "x-expires",
        "x-max-length",
        "x-max-length-bytes",
        "x-max-priority",
        "x-message-ttl",
        "x-overflow",
        "x-queue-mode",
        "x-queue-type",
        "x-single-active-consumer",
    }
)
"""The queue arguments RabbitMQ compares on redeclaration; others may differ freely."""


def compared(arguments: dict[str, HeaderValue]) -> dict[str, HeaderValue]:
    """The arguments of a declaration that must match an existing queue's."""
    return {k: v for k, v in arguments.items() if k in EQUIVALENCE_ARGS}


@dataclass(eq=False, slots=True)
class Exchange:
    """An exchange: its bindings and the routes computed from them."""

    name: str
    kind: ExchangeKind
    durable: bool
    bindings: list[tuple[str, str]] = field(default_factory=list)  # (queue, key)
    routes: dict[str, tuple[Queue, ...]] = field(default_factory=dict)
    """Routing key -> matching queues, in binding order; cleared when bindings or
    queues change (routing is then a dict lookup, topic matching included)."""


class Queue:
    """One queue: ready messages by priority, its consumers, its dead-letter target."""

    __slots__ = (
        "arguments",
        "auto_delete",
        "consumers",
        "dead_letter_exchange",
        "dead_letter_key",
        "durable",
        "exclusive",
        "expiry_timer",
        "had_consumer",
        "levels",
        "max_length",
        "message_ttl_s",
        "name",
        "next_consumer",
        "next_seq",
        "owner",
        "ready",
    )

    def __init__(self, spec: QueueSpec, name: str, owner: InMemoryTransport | None) -> None:
        self.name = name
        self.durable = spec.durable
        self.exclusive = spec.exclusive
        self.auto_delete = spec.auto_delete
        self.arguments = dict(spec.arguments)
        self.owner = owner
        max_priority = spec.arguments.get("x-max-priority")
        levels = int(max_priority) + 1 if isinstance(max_priority, int) else 1
        self.levels: list[deque[Message]] = [deque() for _ in range(levels)]
        self.ready = 0
        dlx = spec.arguments.get("x-dead-letter-exchange")
        self.dead_letter_exchange = dlx if isinstance(dlx, str) else None
        dlk = spec.arguments.get("x-dead-letter-routing-key")
        self.dead_letter_key = dlk if isinstance(dlk, str) else None
        self.consumers: list[Consumer] = []
        self.next_consumer = 0
        self.had_consumer = False
        self.next_seq = 0
        self.expiry_timer: asyncio.TimerHandle | None = None
        ttl = spec.arguments.get("x-message-ttl")
        self.message_ttl_s = ttl / 1000.0 if isinstance(ttl, int) and ttl >= 0 else None
        limit = spec.arguments.get("x-max-length")
        overflow = spec.arguments.get("x-overflow")
        # Only reject-publish is modelled: a full queue nacks new messages.
        self.max_length = limit if isinstance(limit, int) and overflow == "reject-publish" else None

    def push(self, message: Message) -> None:
        """Append a new message to its priority level."""
        self.next_seq += 1
        message.seq = self.next_seq
        self.levels[min(message.priority, len(self.levels) - 1)].append(message)
        self.ready += 1

    def restore(self, message: Message) -> None:
        """Put a requeued message back at its original position, as RabbitMQ does."""
        level = self.levels[min(message.priority, len(self.levels) - 1)]
        level.insert(bisect.bisect_left(level, message.seq, key=_seq), message)
        self.ready += 1

    def next_expiry(self) -> float | None:
        """When the earliest head of a level expires (only heads expire, as in RabbitMQ)."""
        times = [level[0].expires_at for level in self.levels if level]
        pending = [t for t in times if t is not None]
        return min(pending) if pending else None

    def pop(self, now: float, expired: list[Message]) -> Message | None:
        """The next message to deliver; expired ones met at the head go to ``expired``."""
        for level in reversed(self.levels):
            while level:
                message = level.popleft()
                self.ready -= 1
                if message.expires_at is not None and message.expires_at < now:
                    expired.append(message)
                    continue
                return message
        return None

    def drop_expired_heads(self, now: float, expired: list[Message]) -> None:
        """Move the expired heads of every level to ``expired``."""
        for level in self.levels:
            while level and level[0].expires_at is not None and level[0].expires_at < now:
                expired.append(level.popleft())
                self.ready -= 1


def next_consumer(queue: Queue) -> Consumer | None:
    """The next consumer with room, round-robin; ``None`` if all are full."""
    consumers = queue.consumers
    count = len(consumers)
    if count == 1:  # the common case: no round-robin arithmetic
        only = consumers[0]
        return only if only.has_room() else None
    for offset in range(count):
        candidate = consumers[(queue.next_consumer + offset) % count]
        if candidate.has_room():
            queue.next_consumer = (queue.next_consumer + offset + 1) % count
            return candidate
    return None
