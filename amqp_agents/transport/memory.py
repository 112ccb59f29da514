"""An in-process broker and transport with RabbitMQ's semantics.

Not a mock: messages go through real exchanges and queues. It implements what the
library relies on, the way RabbitMQ 3.10 does it, and the shared contract tests
(``tests/contract``) hold both transports to the same behaviour:

* exchanges: direct, topic (``*``/``#`` via :func:`~amqp_agents.models.topic.topic_matches`),
  fanout, and the default exchange ``""`` (routes to the queue named by the key);
* queues: durable flag, exclusive (owned by one connection, deleted with it),
  auto-delete (deleted when its last consumer goes), server-named (``name=""``),
  ``x-max-priority`` (higher first, FIFO within a priority, above the max counts as
  the max, none counts as 0), ``x-dead-letter-exchange``/``-routing-key``;
* per-message ``expiration``: expires at the head of the queue (as in RabbitMQ), then
  dead-lettered with reason ``expired`` or dropped;
* consumers: prefetch (unacked deliveries count against it), round-robin, no-ack;
  each delivery runs in its own task, like aiormq's;
* settlement: ack, nack(requeue) with ``redelivered=True``, reject to the dead-letter
  exchange; a second settlement, or one after the consumer's channel closed, is a no-op;
* mandatory publishes that match no queue raise ``UnroutableError``;
* deleting a queue (:meth:`InMemoryBroker.delete_queue`) cancels its consumers as
  RabbitMQ's ``basic.cancel`` does, and every consumer reports its end through
  ``on_end`` (cancelled, channel closed, connection lost);
* :meth:`InMemoryTransport.simulate_connection_loss` drops a connection the way a cut
  TCP link does, and :meth:`InMemoryTransport.simulate_channel_close` closes one
  consumer's channel the way a broker's channel error does, for fault-injection tests.

Known differences: nothing is persisted (durable only matters for redeclaration
checks); there is no flow control, no memory alarm, and publishes never block;
``x-death`` is reduced to the ``x-first-death-*`` headers; queue arguments other than
priority, dead-lettering, ``x-message-ttl`` and ``x-max-length`` with ``x-overflow:
reject-publish`` (``x-max-length-bytes``, drop-head...) are checked on redeclaration but
not enforced.

It is over 1,000 lines because the broker (exchanges, queues, routing, expiry), its
consumers and deliveries, and the transport facade share it; splitting along those
seams is issue 19.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import itertools
import logging
import os
import time
import types
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Self

from amqp_agents.errors import (
    AccessRefusedError,
    BrokerUnavailableError,
    LifecycleError,
    PublishRejectedError,
    QueueNotFoundError,
    ResourceLockedError,
    TopologyMismatchError,
    UnroutableError,
)
from amqp_agents.models.envelope import Envelope
from amqp_agents.models.topic import topic_matches
from amqp_agents.transport.base import (
    ConsumerEnd,
    ConsumerHandle,
    DeliveryHandler,
    EndCallback,
    EndReason,
    ExchangeKind,
    QueueInfo,
    QueueSpec,
    blocked_too_long,
    discard_callback,
    not_restored_in_time,
    report_end,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Generator

    from amqp_agents.models.envelope import HeaderValue

__all__ = ["BrokerStatistics", "InMemoryBroker", "InMemoryTransport"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Message:
    envelope: Envelope
    priority: int
    expires_at: float | None
    seq: int = 0  # enqueue order in its queue: a requeue puts it back in its place
    redelivered: bool = False


_ROUTE_CACHE_SIZE = 4096
"""Routing keys remembered per exchange before the cache starts over."""


def _seq(message: _Message) -> int:
    return message.seq


# The queue arguments RabbitMQ compares on redeclaration; others may differ freely.
_EQUIVALENCE_ARGS = frozenset(
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


def _compared(arguments: dict[str, HeaderValue]) -> dict[str, HeaderValue]:
    return {k: v for k, v in arguments.items() if k in _EQUIVALENCE_ARGS}


@dataclass(eq=False, slots=True)
class _Exchange:
    name: str
    kind: ExchangeKind
    durable: bool
    bindings: list[tuple[str, str]] = field(default_factory=list)  # (queue, key)
    routes: dict[str, tuple[_Queue, ...]] = field(default_factory=dict)
    """Routing key -> matching queues, in binding order; cleared when bindings or
    queues change (routing is then a dict lookup, topic matching included)."""


class _Queue:
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
        self.levels: list[deque[_Message]] = [deque() for _ in range(levels)]
        self.ready = 0
        dlx = spec.arguments.get("x-dead-letter-exchange")
        self.dead_letter_exchange = dlx if isinstance(dlx, str) else None
        dlk = spec.arguments.get("x-dead-letter-routing-key")
        self.dead_letter_key = dlk if isinstance(dlk, str) else None
        self.consumers: list[_Consumer] = []
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

    def push(self, message: _Message) -> None:
        """Append a new message to its priority level."""
        self.next_seq += 1
        message.seq = self.next_seq
        self.levels[min(message.priority, len(self.levels) - 1)].append(message)
        self.ready += 1

    def restore(self, message: _Message) -> None:
        """Put a requeued message back at its original position, as RabbitMQ does."""
        level = self.levels[min(message.priority, len(self.levels) - 1)]
        level.insert(bisect.bisect_left(level, message.seq, key=_seq), message)
        self.ready += 1

    def next_expiry(self) -> float | None:
        """When the earliest head of a level expires (only heads expire, as in RabbitMQ)."""
        times = [level[0].expires_at for level in self.levels if level]
        pending = [t for t in times if t is not None]
        return min(pending) if pending else None

    def pop(self, now: float, expired: list[_Message]) -> _Message | None:
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

    def drop_expired_heads(self, now: float, expired: list[_Message]) -> None:
        for level in self.levels:
            while level and level[0].expires_at is not None and level[0].expires_at < now:
                expired.append(level.popleft())
                self.ready -= 1


def _next_consumer(queue: _Queue) -> _Consumer | None:
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
        self._exchanges: dict[str, _Exchange] = {}
        self._queues: dict[str, _Queue] = {}
        self._names = (f"amq.gen-{os.urandom(6).hex()}-{n}" for n in itertools.count(1))
        self._tags = itertools.count(1)
        self._id_prefix = f"mem-{os.urandom(4).hex()}-"
        self._capped = 0
        """Queues with a length limit (while none exist, publishes skip the check)."""

    def statistics(self) -> BrokerStatistics:
        """Ready messages, consumers and unacked deliveries per queue."""
        now = time.monotonic()
        queues: dict[str, QueueInfo] = {}
        unacked: dict[str, int] = {}
        for name, queue in self._queues.items():
            self._expire_heads(queue, now)
            queues[name] = QueueInfo(name, queue.ready, len(queue.consumers))
            unacked[name] = sum(len(c.unacked) for c in queue.consumers)
        return BrokerStatistics(queues, unacked, tuple(self._exchanges))

    # -- topology (called by transports) -----------------------------------------------

    def _declare_exchange(self, name: str, kind: ExchangeKind, durable: bool) -> None:
        if name.startswith("amq.") or name == "":
            raise AccessRefusedError(f"exchange name {name!r} is reserved by the broker")
        existing = self._exchanges.get(name)
        if existing is None:
            self._exchanges[name] = _Exchange(name, kind, durable)
        elif existing.kind is not kind or existing.durable != durable:
            raise TopologyMismatchError(
                f"exchange {name!r} already exists as {existing.kind.value}"
                f" (durable={existing.durable}); it cannot be redeclared as {kind.value}"
                f" (durable={durable})"
            )

    def _declare_queue(self, spec: QueueSpec, owner: InMemoryTransport) -> str:
        name = spec.name or next(self._names)
        existing = self._queues.get(name)
        if existing is not None:
            self._check_owner(existing, owner)
            mismatch = [
                what
                for what, ours, theirs in (
                    ("durable", existing.durable, spec.durable),
                    ("exclusive", existing.exclusive, spec.exclusive),
                    ("auto_delete", existing.auto_delete, spec.auto_delete),
                    (
                        "arguments",
                        _compared(existing.arguments),
                        _compared(dict(spec.arguments)),
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
        created = self._queues[name] = _Queue(spec, name, owner if spec.exclusive else None)
        if created.max_length is not None:
            self._capped += 1
        return name

    def _queue(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            raise QueueNotFoundError(f"no queue {name!r}")
        return queue

    def _exchange(self, name: str) -> _Exchange:
        exchange = self._exchanges.get(name)
        if exchange is None:
            raise QueueNotFoundError(f"no exchange {name!r}")
        return exchange

    @staticmethod
    def _check_owner(queue: _Queue, transport: InMemoryTransport) -> None:
        if queue.owner is not None and queue.owner is not transport:
            raise ResourceLockedError(f"queue {queue.name!r} is exclusive to another connection")

    def _bind(self, queue: str, exchange: str, key: str) -> None:
        if exchange == "":
            raise AccessRefusedError("queues cannot be bound to the default exchange")
        target = self._exchange(exchange)
        self._queue(queue)
        if (queue, key) not in target.bindings:
            target.bindings.append((queue, key))
            target.routes.clear()

    def _unbind(self, queue: str, exchange: str, key: str) -> None:
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
        self._delete_queue(queue)
        for consumer in consumers:
            consumer.end(EndReason.CANCELLED, None, f"queue {name!r} was deleted")
        return dropped

    def delete_exchange(self, name: str) -> None:
        """Delete an exchange and its bindings, as an operator can (a no-op if absent)."""
        self._exchanges.pop(name, None)

    def _delete_queue(self, queue: _Queue) -> None:
        if self._queues.pop(queue.name, None) is not None and queue.max_length is not None:
            self._capped -= 1
        if queue.expiry_timer is not None:
            queue.expiry_timer.cancel()
        for exchange in self._exchanges.values():
            exchange.bindings = [b for b in exchange.bindings if b[0] != queue.name]
            exchange.routes.clear()

    # -- routing and delivery ----------------------------------------------------------

    def _route(self, exchange_name: str, key: str) -> tuple[_Queue, ...]:
        if exchange_name == "":
            direct = self._queues.get(key)
            return () if direct is None else (direct,)
        exchange = self._exchange(exchange_name)
        routed = exchange.routes.get(key)
        if routed is None:
            routed = self._match(exchange, key)
            if len(exchange.routes) >= _ROUTE_CACHE_SIZE:  # keys may be unbounded (events)
                exchange.routes.clear()
            exchange.routes[key] = routed
        return routed

    def _match(self, exchange: _Exchange, key: str) -> tuple[_Queue, ...]:
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

    def _publish(self, envelope: Envelope, *, mandatory: bool, confirm: bool = True) -> None:
        try:
            queues = self._route(envelope.exchange, envelope.routing_key)
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
            message = _Message(stored, priority, expiry)
            if not queue.ready and queue.consumers:
                # Nothing waits ahead of it: straight to a consumer with room, if any.
                # (A zero TTL still reaches a consumer that can take it right now.)
                consumer = _next_consumer(queue)
                if consumer is not None:
                    queue.next_seq += 1
                    message.seq = queue.next_seq
                    consumer.deliver(message)
                    continue
            queue.push(message)
            if queue.consumers:
                self._pump(queue, now)
            if queue.ready:
                self._schedule_expiry(queue)
        if rejected is not None and confirm:
            raise PublishRejectedError(
                f"the broker refused the message: queue {rejected!r} is full"
                " (x-overflow reject-publish)"
            )

    def _pump(self, queue: _Queue, now: float | None = None) -> None:
        """Deliver ready messages to consumers with room, round-robin."""
        consumers = queue.consumers
        if not consumers or not queue.ready:
            return
        now = time.monotonic() if now is None else now
        expired: list[_Message] = []
        while queue.ready and consumers:
            consumer = _next_consumer(queue)
            if consumer is None:
                break
            message = queue.pop(now, expired)
            if message is None:
                break
            consumer.deliver(message)
        if expired:
            self._dead_letter_all(queue, expired, "expired")
        if queue.ready:  # a new head may expire sooner than the timer set before
            self._schedule_expiry(queue)

    def _expire_heads(self, queue: _Queue, now: float) -> None:
        expired: list[_Message] = []
        queue.drop_expired_heads(now, expired)
        self._dead_letter_all(queue, expired, "expired")

    def _schedule_expiry(self, queue: _Queue) -> None:
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

    def _on_expiry_timer(self, queue: _Queue) -> None:
        queue.expiry_timer = None
        if self._queues.get(queue.name) is not queue:
            return
        self._expire_heads(queue, time.monotonic())
        self._pump(queue)
        self._schedule_expiry(queue)

    def _dead_letter_all(self, queue: _Queue, messages: list[_Message], reason: str) -> None:
        for message in messages:
            self._dead_letter(queue, message, reason)

    def _dead_letter(self, queue: _Queue, message: _Message, reason: str) -> None:
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
            self._publish(dead, mandatory=False)
        except QueueNotFoundError:
            log.debug("dead-letter exchange %r of %s does not exist", exchange, queue.name)

    def _requeue(self, queue_name: str, message: _Message) -> None:
        queue = self._queues.get(queue_name)
        if queue is None:
            return
        message.redelivered = True
        queue.restore(message)
        self._pump(queue)
        self._schedule_expiry(queue)

    def _settled(self, queue_name: str) -> None:
        queue = self._queues.get(queue_name)
        if queue is not None and queue.ready:  # room freed: the next one may go
            self._pump(queue)

    def _reject(self, queue_name: str, message: _Message) -> None:
        queue = self._queues.get(queue_name)
        if queue is not None:
            self._dead_letter(queue, message, "rejected")
            self._pump(queue)


class _MemoryDelivery:
    """A delivery of one consumer; settling it returns capacity to the consumer."""

    __slots__ = ("_consumer", "_message", "_settled", "_tag", "envelope")

    def __init__(self, consumer: _Consumer, message: _Message, tag: int) -> None:
        self._consumer = consumer
        self._message = message
        self._tag = tag
        self._settled = consumer.no_ack
        stored = message.envelope
        self.envelope = (
            dataclasses.replace(stored, redelivered=True) if message.redelivered else stored
        )

    async def ack(self) -> None:
        if self._settle():
            self._consumer.broker._settled(self._consumer.queue_name)

    async def nack(self, *, requeue: bool = True) -> None:
        if self._settle():
            broker = self._consumer.broker
            if requeue:
                broker._requeue(self._consumer.queue_name, self._message)
            else:
                broker._reject(self._consumer.queue_name, self._message)

    async def reject(self) -> None:
        await self.nack(requeue=False)

    def _settle(self) -> bool:
        # Once, and only while the consumer's channel lives (else: the broker has
        # requeued it already, as RabbitMQ does when a channel closes).
        if self._settled or self._consumer.closed:
            return False
        self._settled = True
        self._consumer.unacked.pop(self._tag, None)
        return True


class _Consumer:
    """A consumer on its own (virtual) channel, as the RabbitMQ transport does."""

    __slots__ = (
        "asked",
        "broker",
        "cancelled",
        "closed",
        "ended",
        "handler",
        "loop",
        "no_ack",
        "on_end",
        "prefetch",
        "queue_name",
        "tasks",
        "transport",
        "unacked",
    )

    def __init__(
        self,
        transport: InMemoryTransport,
        queue: str,
        handler: DeliveryHandler,
        prefetch: int,
        no_ack: bool,
        on_end: EndCallback | None,
    ) -> None:
        self.transport = transport
        self.on_end = on_end
        self.ended: ConsumerEnd | None = None
        self.asked = False
        self.broker = transport.broker
        self.queue_name = queue
        self.handler = handler
        self.prefetch = prefetch
        self.no_ack = no_ack
        self.unacked: dict[int, _Message] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}
        """Running deliveries by tag (each removes itself: no done callback to schedule)."""
        self.loop = asyncio.get_running_loop()
        self.cancelled = False
        self.closed = False

    @property
    def queue(self) -> str:
        return self.queue_name

    def has_room(self) -> bool:
        return self.no_ack or self.prefetch <= 0 or len(self.unacked) < self.prefetch

    def deliver(self, message: _Message) -> None:
        tag = next(self.broker._tags)
        if not self.no_ack:
            self.unacked[tag] = message
        delivery = _MemoryDelivery(self, message, tag)
        if self.no_ack:
            self.loop.call_soon(self._start_no_ack, delivery, tag)
        else:
            self.tasks[tag] = self.loop.create_task(self._run(delivery, tag))

    def _start_no_ack(self, delivery: _MemoryDelivery, tag: int) -> None:
        """Run a no-ack handler's first step from the loop; a task only if it suspends.

        A reply handler (the no-ack consumer the library has) finishes in its first
        step: it files the reply and returns. A task per reply would double the
        scheduling cost of an in-memory round trip.
        """
        if self.closed:
            return
        coro = self._run(delivery, tag)
        try:
            yielded = coro.send(None)
        except StopIteration:
            return
        self.tasks[tag] = self.loop.create_task(_carry_on(coro, yielded))

    async def _run(self, delivery: _MemoryDelivery, tag: int) -> None:
        try:
            await self.handler(delivery)
        except Exception:
            log.exception("consumer of %s failed", self.queue_name)
        finally:
            self.tasks.pop(tag, None)

    def detach(self) -> None:
        """Stop receiving (basic.cancel): leave the queue, keep unacked ones."""
        if self.cancelled:
            return
        self.cancelled = True
        queue = self.broker._queues.get(self.queue_name)
        if queue is None:
            return
        if self in queue.consumers:
            queue.consumers.remove(self)
        if queue.auto_delete and queue.had_consumer and not queue.consumers:
            self.broker._delete_queue(queue)

    def close_channel(self) -> None:
        """The channel closes: cancel its tasks, requeue what is unacked."""
        self.detach()
        if self.closed:
            return
        self.closed = True
        if self in self.transport._consumers:  # no longer the connection's
            self.transport._consumers.remove(self)
        tasks, self.tasks = self.tasks, {}  # one cancelled before it ran cannot remove itself
        for task in tasks.values():
            task.cancel()
        unacked, self.unacked = self.unacked, {}
        queue = self.broker._queues.get(self.queue_name)
        if queue is None:
            return
        for message in unacked.values():
            message.redelivered = True
            queue.restore(message)
        self.broker._pump(queue)
        self.broker._schedule_expiry(queue)

    def end(self, reason: EndReason, code: int | None, text: str) -> None:
        """Stop receiving without the owner asking, and say so once (``on_end``).

        A cancel by the broker keeps the channel (its deliveries stay settleable); a
        channel or connection end closes it (they are requeued).
        """
        if reason is EndReason.CANCELLED:
            self.detach()
        else:
            self.close_channel()
        if self.asked or self.ended is not None:
            return
        self.ended = ConsumerEnd(self.queue_name, reason, code, text)
        report_end(self.on_end, self.ended)

    async def cancel(self) -> None:
        self.asked = True
        self.detach()

    async def close(self) -> None:
        self.asked = True
        self.close_channel()


async def _carry_on(coro: Coroutine[Any, Any, None], yielded: Any) -> None:
    """Finish, inside a task, a coroutine that already ran up to its first suspension."""
    await _resume(coro, yielded)


@types.coroutine
def _resume(coro: Coroutine[Any, Any, None], yielded: Any) -> Generator[Any, Any, None]:
    # Hands what the coroutine awaits to the task, and the task's answer (a value, or
    # a cancellation thrown in) back to the coroutine, until it returns.
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:  # relayed, never swallowed
            try:
                yielded = coro.throw(exc)
            except StopIteration:
                return
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration:
                return


class _State(Enum):
    NEW = "new"
    CONNECTED = "connected"
    LOST = "lost"
    CLOSED = "closed"


class InMemoryTransport:
    """:class:`~amqp_agents.transport.base.Transport` on an :class:`InMemoryBroker`."""

    def __init__(self, broker: InMemoryBroker | None = None) -> None:
        self.broker = broker if broker is not None else InMemoryBroker()
        self._state = _State.NEW
        self._consumers: list[_Consumer] = []
        self._lost_callbacks: list[Callable[[BaseException | None], None]] = []
        self._restored_callbacks: list[Callable[[], Awaitable[None]]] = []
        self._usable = asyncio.Event()
        self._coming_back = False
        self._blocked = False
        self.reconnects = 0
        """Connections re-established after a loss (:meth:`simulate_reconnect`)."""

    def __repr__(self) -> str:
        return f"<InMemoryTransport {self._state.value}>"

    @property
    def is_connected(self) -> bool:
        return self._state is _State.CONNECTED

    @property
    def is_blocked(self) -> bool:
        return self._blocked

    @property
    def will_reconnect(self) -> bool:
        """After a loss: whether :meth:`simulate_connection_loss` said a
        :meth:`simulate_reconnect` is coming; before one: false."""
        return self._state is not _State.CLOSED and self._coming_back

    async def connect(self) -> None:
        if self._state is not _State.NEW:
            raise LifecycleError(f"transport is {self._state.value}; connect() runs once")
        self._state = _State.CONNECTED
        self._usable.set()

    async def aclose(self) -> None:
        if self._state is _State.CLOSED:
            return
        was_connected = self._state is _State.CONNECTED
        self._state = _State.CLOSED
        self._usable.set()  # wake waiting publishes: they fail at once
        if was_connected:
            self._drop_connection()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def on_connection_lost(
        self, callback: Callable[[BaseException | None], None]
    ) -> Callable[[], None]:
        self._lost_callbacks.append(callback)
        return lambda: discard_callback(self._lost_callbacks, callback)

    def on_connection_restored(self, callback: Callable[[], Awaitable[None]]) -> Callable[[], None]:
        self._restored_callbacks.append(callback)
        return lambda: discard_callback(self._restored_callbacks, callback)

    def simulate_connection_loss(
        self, reason: BaseException | None = None, *, will_reconnect: bool = False
    ) -> None:
        """Drop this connection like a cut TCP link (for fault-injection tests).

        Its consumers vanish, their unacked deliveries return to their queues as
        redelivered, its exclusive queues are deleted, and the connection-lost
        callbacks run once. Other operations then raise ``BrokerUnavailableError``;
        publishes do too, unless ``will_reconnect`` says a :meth:`simulate_reconnect`
        is coming: then they wait for it within their timeout (as a reconnecting
        RabbitMQ transport does).
        """
        if self._state is not _State.CONNECTED:
            return
        self._state = _State.LOST
        self._coming_back = will_reconnect
        self._usable.clear()
        text = "connection lost" if reason is None else f"{type(reason).__name__}: {reason}"
        for consumer in list(self._consumers):
            consumer.end(EndReason.CONNECTION_LOST, None, text)
        self._drop_connection()
        for callback in list(self._lost_callbacks):
            try:
                callback(reason)
            except Exception:
                log.exception("connection-lost callback failed")

    async def simulate_reconnect(self) -> None:
        """Come back after :meth:`simulate_connection_loss`: the restored callbacks run
        (owners re-declare and re-consume), then waiting publishes go on."""
        if self._state is not _State.LOST:
            raise LifecycleError(f"transport is {self._state.value}, not lost")
        self._state = _State.CONNECTED
        for callback in list(self._restored_callbacks):
            try:
                await callback()
            except Exception:
                log.exception("restoring after a reconnect failed")
        self.reconnects += 1
        if not self._blocked:
            self._usable.set()

    def simulate_channel_close(
        self, consumer: ConsumerHandle, *, code: int = 406, text: str = "PRECONDITION_FAILED"
    ) -> None:
        """Close one consumer's channel as the broker does on a channel error: its
        unacked deliveries are requeued, and it reports ``channel_closed`` with the code."""
        if not isinstance(consumer, _Consumer) or consumer.transport is not self:
            raise LifecycleError("not a consumer of this transport")
        consumer.end(EndReason.CHANNEL_CLOSED, code, text)

    def simulate_blocked(self, blocked: bool) -> None:
        """Start or end a broker resource alarm: publishes wait while blocked."""
        self._blocked = blocked
        if blocked:
            self._usable.clear()
        elif self._state is _State.CONNECTED:
            self._usable.set()

    def _drop_connection(self) -> None:
        consumers, self._consumers = self._consumers, []
        for consumer in consumers:
            consumer.close_channel()
        for queue in list(self.broker._queues.values()):
            if queue.owner is self:
                self.broker._delete_queue(queue)

    def _require_connected(self) -> None:
        if self._state is _State.CONNECTED:
            return
        if self._state is _State.LOST:
            raise BrokerUnavailableError("the broker connection is lost")
        raise LifecycleError(f"transport is {self._state.value}, not connected")

    # -- topology --------------------------------------------------------------------

    async def declare_exchange(
        self, name: str, kind: ExchangeKind, *, durable: bool = True
    ) -> None:
        self._require_connected()
        self.broker._declare_exchange(name, kind, durable)

    async def declare_queue(self, spec: QueueSpec) -> str:
        self._require_connected()
        return self.broker._declare_queue(spec, self)

    async def bind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        self._require_connected()
        self.broker._bind(queue, exchange, routing_key)

    async def unbind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        self._require_connected()
        self.broker._unbind(queue, exchange, routing_key)

    async def delete_queue(self, queue: str) -> int:
        self._require_connected()
        found = self.broker._queues.get(queue)
        if found is not None:
            self.broker._check_owner(found, self)
        return self.broker.delete_queue(queue)

    async def queue_info(self, queue: str) -> QueueInfo:
        self._require_connected()
        found = self.broker._queue(queue)
        self.broker._check_owner(found, self)
        self.broker._expire_heads(found, time.monotonic())
        return QueueInfo(queue, found.ready, len(found.consumers))

    # -- messages --------------------------------------------------------------------

    async def publish(
        self,
        envelope: Envelope,
        *,
        mandatory: bool = False,
        confirm: bool = True,
        timeout_s: float,
    ) -> None:
        if self._state is not _State.CONNECTED or self._blocked:
            await self._wait_usable(timeout_s)
            self._require_connected()
        # Like the RabbitMQ transport, a return is only reported on confirmed publishes.
        self.broker._publish(envelope, mandatory=mandatory and confirm, confirm=confirm)

    async def _wait_usable(self, timeout_s: float) -> None:
        if self._state is _State.LOST and not self._coming_back:
            raise BrokerUnavailableError("the broker connection is lost")
        if self._state is not _State.LOST and not self._blocked:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await self._usable.wait()
        except TimeoutError:
            if self._blocked:
                raise blocked_too_long(timeout_s) from None
            raise not_restored_in_time(timeout_s) from None

    async def consume(
        self,
        queue: str,
        handler: DeliveryHandler,
        *,
        prefetch: int,
        no_ack: bool = False,
        on_end: EndCallback | None = None,
    ) -> ConsumerHandle:
        self._require_connected()
        target = self.broker._queue(queue)
        self.broker._check_owner(target, self)
        consumer = _Consumer(self, queue, handler, prefetch, no_ack, on_end)
        target.consumers.append(consumer)
        target.had_consumer = True
        self._consumers.append(consumer)
        self.broker._pump(target)
        return consumer
