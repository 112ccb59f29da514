"""The in-memory broker: exchanges, queues, routing, expiry and dead-lettering.

Private to :mod:`amqp_agents.transport.mem`, except for what a test drives as an
operator would (:meth:`InMemoryBroker.delete_queue`, :meth:`~InMemoryBroker.delete_exchange`,
:meth:`~InMemoryBroker.statistics`). Transports and consumers of this package call the
rest of its methods: that is its API to them, and nothing else reaches into its state.
It is about 400 lines because publishing, expiry and dead-lettering act on the same
queues in one place (as RabbitMQ's queue process does); the data itself lives in
:mod:`~amqp_agents.transport.mem.queues`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from amqp_agents.errors import (
    AccessRefusedError,
    PublishRejectedError,
    QueueNotFoundError,
    ResourceLockedError,
    TopologyMismatchError,
    UnroutableError,
)
from amqp_agents.models.envelope import Envelope
from amqp_agents.models.topic import topic_matches
from amqp_agents.transport.base import EndReason, ExchangeKind, QueueInfo
from amqp_agents.transport.mem.queues import (
    ROUTE_CACHE_SIZE,
    Exchange,
    Message,
    Queue,
    compared,
    next_consumer,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from amqp_agents.models.envelope import HeaderValue
    from amqp_agents.models.topology import QueueSpec
    from amqp_agents.transport.mem.transport import InMemoryTransport

__all__ = ["BrokerStatistics", "InMemoryBroker"]

log = logging.getLogger("amqp_agents.transport.memory")


@dataclass(frozen=True, slots=True)
class BrokerStatistics:
    """A snapshot of an :class:`InMemoryBroker` (like ``rabbitmqctl list_queues``)."""

    queues: dict[str, QueueInfo]
    unacked: dict[str, int]
    exchanges: tuple[str, ...]


class InMemoryBroker:
    """The state of one broker: exchanges, queues, bindings.

    Every :class:`InMemoryTransport` given the same broker is a connection to it, so
    a test can run a worker and a client (or two "pods") against one broker.
    """

    def __init__(self) -> None:
        self._exchanges: dict[str, Exchange] = {}
        self._queues: dict[str, Queue] = {}
        self._names = (f"amq.gen-{os.urandom(6).hex()}-{n}" for n in itertools.count(1))
        self._tags = itertools.count(1)
        self._id_prefix = f"mem-{os.urandom(4).hex()}-"
        self._capped = 0
        """Queues with a length limit (while none exist, publishes skip the check)."""

    def find(self, name: str) -> Queue | None:
        """The queue called ``name``, if it exists."""
        return self._queues.get(name)

    def queues(self) -> Iterator[Queue]:
        """Every queue (a snapshot: the caller may delete while iterating)."""
        return iter(list(self._queues.values()))

    def next_tag(self) -> int:
        """A new delivery tag, unique in this broker."""
        return next(self._tags)

    def statistics(self) -> BrokerStatistics:
        """Ready messages, consumers and unacked deliveries per queue."""
        now = time.monotonic()
        queues: dict[str, QueueInfo] = {}
        unacked: dict[str, int] = {}
        for name, queue in self._queues.items():
            self.expire_heads(queue, now)
            queues[name] = QueueInfo(name, queue.ready, len(queue.consumers))
            unacked[name] = sum(len(c.unacked) for c in queue.consumers)
        return BrokerStatistics(queues, unacked, tuple(self._exchanges))

    # -- topology (called by transports) -----------------------------------------------

    def declare_exchange(self, name: str, kind: ExchangeKind, durable: bool) -> None:
        if name.startswith("amq.") or name == "":
            raise AccessRefusedError(f"exchange name {name!r} is reserved by the broker")
        existing = self._exchanges.get(name)
        if existing is None:
            self._exchanges[name] = Exchange(name, kind, durable)
        elif existing.kind is not kind or existing.durable != durable:
            raise TopologyMismatchError(
                f"exchange {name!r} already exists as {existing.kind.value}"
                f" (durable={existing.durable}); it cannot be redeclared as {kind.value}"
                f" (durable={durable})"
            )

    def declare_queue(self, spec: QueueSpec, owner: InMemoryTransport) -> str:
        name = spec.name or next(self._names)
        existing = self._queues.get(name)
        if existing is not None:
            self.check_owner(existing, owner)
            mismatch = [
                what
                for what, ours, theirs in (
                    ("durable", existing.durable, spec.durable),
                    ("exclusive", existing.exclusive, spec.exclusive),
                    ("auto_delete", existing.auto_delete, spec.auto_delete),
                    (
                        "arguments",
                        compared(existing.arguments),
                        compared(dict(spec.arguments)),
                    ),
                )
                if ours != theirs
            ]
            if mismatch:
                old = str(existing.arguments.get("x-queue-type", "classic"))
                new = str(spec.arguments.get("x-queue-type", "classic"))
                kinds = "" if old == new else f": it is a {old} queue, this declares a {new} queue"
                raise TopologyMismatchError(
                    f"queue {name!r} already exists with different {', '.join(mismatch)}{kinds}"
                    f" (current arguments {existing.arguments}, requested"
                    f" {dict(spec.arguments)}). Queue arguments cannot change after"
                    " declaration: use the existing values, or delete the queue and"
                    " declare it again."
                )
            return name
        created = self._queues[name] = Queue(spec, name, owner if spec.exclusive else None)
        if created.max_length is not None:
            self._capped += 1
        return name

    def queue(self, name: str) -> Queue:
        queue = self._queues.get(name)
        if queue is None:
            raise QueueNotFoundError(f"no queue {name!r}")
        return queue

    def _exchange(self, name: str) -> Exchange:
        exchange = self._exchanges.get(name)
        if exchange is None:
            raise QueueNotFoundError(f"no exchange {name!r}")
        return exchange

    @staticmethod
    def check_owner(queue: Queue, transport: InMemoryTransport) -> None:
        if queue.owner is not None and queue.owner is not transport:
            raise ResourceLockedError(f"queue {queue.name!r} is exclusive to another connection")

    def bind(self, queue: str, exchange: str, key: str) -> None:
        if exchange == "":
            raise AccessRefusedError("queues cannot be bound to the default exchange")
        target = self._exchange(exchange)
        self.queue(queue)
        if (queue, key) not in target.bindings:
            target.bindings.append((queue, key))
            target.routes.clear()

    def unbind(self, queue: str, exchange: str, key: str) -> None:
        target = self._exchanges.get(exchange)
        if target is not None and (queue, key) in target.bindings:
            target.bindings.remove((queue, key))
            target.routes.clear()

    def delete_queue(self, name: str) -> int:
        """Delete a queue as ``rabbitmqctl delete_queue`` does: its ready messages go
        with it, its consumers are cancelled (``on_end`` reports ``cancelled``) and their
        unsettled deliveries can no longer come back. Returns the ready messages dropped.
        """
        queue = self._queues.get(name)
        if queue is None:
            return 0
        dropped = queue.ready
        consumers, queue.consumers = list(queue.consumers), []
        self.remove(queue)
        for consumer in consumers:
            consumer.end(EndReason.CANCELLED, None, f"queue {name!r} was deleted")
        return dropped

    def delete_exchange(self, name: str) -> None:
        """Delete an exchange and its bindings, as an operator can (a no-op if absent)."""
        self._exchanges.pop(name, None)

    def remove(self, queue: Queue) -> None:
        """Forget a queue: its bindings, its expiry timer, its length-limit count."""
        if self._queues.pop(queue.name, None) is not None and queue.max_length is not None:
            self._capped -= 1
        if queue.expiry_timer is not None:
            queue.expiry_timer.cancel()
        for exchange in self._exchanges.values():
            exchange.bindings = [b for b in exchange.bindings if b[0] != queue.name]
            exchange.routes.clear()

    # -- routing and delivery ----------------------------------------------------------

    def route(self, exchange_name: str, key: str) -> tuple[Queue, ...]:
        if exchange_name == "":
            direct = self._queues.get(key)
            return () if direct is None else (direct,)
        exchange = self._exchange(exchange_name)
        routed = exchange.routes.get(key)
        if routed is None:
            routed = self._match(exchange, key)
            if len(exchange.routes) >= ROUTE_CACHE_SIZE:  # keys may be unbounded (events)
                exchange.routes.clear()
            exchange.routes[key] = routed
        return routed

    def _match(self, exchange: Exchange, key: str) -> tuple[Queue, ...]:
        names: dict[str, None] = {}  # each queue once, in binding order
        if exchange.kind is ExchangeKind.DIRECT:
            for queue, bound in exchange.bindings:
                if bound == key:
                    names[queue] = None
        elif exchange.kind is ExchangeKind.TOPIC:
            for queue, bound in exchange.bindings:
                if topic_matches(bound, key):
                    names[queue] = None
        else:
            for queue, _bound in exchange.bindings:
                names[queue] = None
        return tuple(self._queues[name] for name in names if name in self._queues)

    def publish(self, envelope: Envelope, *, mandatory: bool, confirm: bool = True) -> None:
        try:
            queues = self.route(envelope.exchange, envelope.routing_key)
        except QueueNotFoundError:
            if confirm:
                raise
            return  # RabbitMQ closes the channel; the unconfirmed message is lost
        if not queues:
            if mandatory:
                raise UnroutableError(envelope.exchange, envelope.routing_key)
            return
        # The broker keeps its own copy: later changes by the publisher don't show.
        # (A positional constructor call: dataclasses.replace costs twice as much.)
        e = envelope
        stored = Envelope(
            e.body,
            e.exchange,
            e.routing_key,
            e.content_type,
            e.type,
            e.message_id or f"{self._id_prefix}{next(self._tags)}",
            e.correlation_id,
            e.reply_to,
            e.priority,
            e.expiration_ms,
            e.timestamp,
            dict(e.headers) if e.headers else None,
            e.persistent,
            False,
        )
        now = time.monotonic()
        ttl = envelope.expiration_ms
        expires_at = None if ttl is None else now + ttl / 1000.0
        priority = envelope.priority or 0
        if priority < 0:
            priority = 0
        rejected = None
        if self._capped:  # some queue has a length limit: the slow path, rarely taken
            full = [q.name for q in queues if q.max_length is not None and q.ready >= q.max_length]
            if full:  # a nack; RabbitMQ routes to the other queues, and so do we
                queues = tuple(q for q in queues if q.name not in full)
                rejected = full[0]
        for queue in queues:
            expiry = expires_at
            if queue.message_ttl_s is not None:  # x-message-ttl: the shorter TTL wins
                queue_expiry = now + queue.message_ttl_s
                expiry = queue_expiry if expiry is None else min(expiry, queue_expiry)
            message = Message(stored, priority, expiry)
            if not queue.ready and queue.consumers:
                # Nothing waits ahead of it: straight to a consumer with room, if any.
                # (A zero TTL still reaches a consumer that can take it right now.)
                consumer = next_consumer(queue)
                if consumer is not None:
                    queue.next_seq += 1
                    message.seq = queue.next_seq
                    consumer.deliver(message)
                    continue
            queue.push(message)
            if queue.consumers:
                self.pump(queue, now)
            if queue.ready:
                self.schedule_expiry(queue)
        if rejected is not None and confirm:
            raise PublishRejectedError(
                f"the broker refused the message: queue {rejected!r} is full"
                " (x-overflow reject-publish)"
            )

    def pump(self, queue: Queue, now: float | None = None) -> None:
        """Deliver ready messages to consumers with room, round-robin."""
        consumers = queue.consumers
        if not consumers or not queue.ready:
            return
        now = time.monotonic() if now is None else now
        expired: list[Message] = []
        while queue.ready and consumers:
            consumer = next_consumer(queue)
            if consumer is None:
                break
            message = queue.pop(now, expired)
            if message is None:
                break
            consumer.deliver(message)
        if expired:
            self._dead_letter_all(queue, expired, "expired")
        if queue.ready:  # a new head may expire sooner than the timer set before
            self.schedule_expiry(queue)

    def expire_heads(self, queue: Queue, now: float) -> None:
        expired: list[Message] = []
        queue.drop_expired_heads(now, expired)
        self._dead_letter_all(queue, expired, "expired")

    def schedule_expiry(self, queue: Queue) -> None:
        """Expire heads on time even if no client touches the queue (RabbitMQ's timer).

        One timer per queue, for its earliest head: a queue full of requests with a TTL
        costs one timer, not one per message.
        """
        if queue.expiry_timer is not None:
            return  # it fires, expires what is due and re-arms for the next head
        when = queue.next_expiry()
        if when is None:
            return
        # Relative to time.monotonic() (expires_at's clock; loop.time() may differ under
        # uvloop), a hair late so that "expires_at < now" holds when it fires.
        delay = max(when - time.monotonic(), 0.0) + 0.001
        queue.expiry_timer = asyncio.get_running_loop().call_later(
            delay, self._on_expiry_timer, queue
        )

    def _on_expiry_timer(self, queue: Queue) -> None:
        queue.expiry_timer = None
        if self._queues.get(queue.name) is not queue:
            return
        self.expire_heads(queue, time.monotonic())
        self.pump(queue)
        self.schedule_expiry(queue)

    def _dead_letter_all(self, queue: Queue, messages: list[Message], reason: str) -> None:
        for message in messages:
            self._dead_letter(queue, message, reason)

    def _dead_letter(self, queue: Queue, message: Message, reason: str) -> None:
        exchange = queue.dead_letter_exchange
        if exchange is None:
            return
        original = message.envelope
        headers: dict[str, HeaderValue] = dict(original.headers or {})
        if "x-first-death-reason" not in headers:
            headers["x-first-death-reason"] = reason
            headers["x-first-death-queue"] = queue.name
            headers["x-first-death-exchange"] = original.exchange
        dead = dataclasses.replace(
            original,
            exchange=exchange,
            routing_key=queue.dead_letter_key or original.routing_key,
            headers=headers,
            expiration_ms=None,  # as RabbitMQ does, so it does not expire again
        )
        try:
            self.publish(dead, mandatory=False)
        except QueueNotFoundError:
            log.debug("dead-letter exchange %r of %s does not exist", exchange, queue.name)

    def requeue(self, queue_name: str, message: Message) -> None:
        queue = self._queues.get(queue_name)
        if queue is None:
            return
        message.redelivered = True
        queue.restore(message)
        self.pump(queue)
        self.schedule_expiry(queue)

    def settled(self, queue_name: str) -> None:
        queue = self._queues.get(queue_name)
        if queue is not None and queue.ready:  # room freed: the next one may go
            self.pump(queue)

    def reject(self, queue_name: str, message: Message) -> None:
        queue = self._queues.get(queue_name)
        if queue is not None:
            self._dead_letter(queue, message, "rejected")
            self.pump(queue)
