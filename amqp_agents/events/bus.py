"""Publish/subscribe on a durable topic exchange, with subscriber groups.

Events go to the topic exchange ``events`` with routing key = event type
(``task.created``). Subscribers bind AMQP topic patterns (``task.*``, ``task.#``,
``#``) and choose how they share events with other processes::

    same group: competing consumers         different groups: fan-out
    (each event handled once per group)     (each group gets every event)

    events --> [events.audit] --+--> pod A      events --+--> [events.audit]  --> audit
                                +--> pod B               +--> [events.billing] --> billing

    no group: broadcast (every process, only while subscribed)

    events --+--> [amq.gen-1 exclusive, auto-delete] --> pod A
             +--> [amq.gen-2 exclusive, auto-delete] --> pod B

Promises: at-least-once per group (a handler may see an event twice after a crash or
a lost connection: use ``Event.id`` to dedupe); order is kept per queue for a single
consumer, never across groups. A group queue is durable: events published while no
member runs wait for it. Private queues exist only while subscribed.

Every consumed queue is a :class:`~amqp_agents.transport.recovery.Recovery`
attachment: when its consumer ends (the queue deleted, its channel closed, the
connection lost and restored) the bus re-declares the group queue (or a new private
one), binds every pattern again and re-consumes it; events published to a group
meanwhile waited in its durable queue (unless the queue itself was deleted), a
private queue's are lost with it.

Failures never loop: an event that is not JSON, fails a handler's schema, or makes a
handler raise or time out is rejected to the group's dead-letter queue
``events.<group>.dead`` (private subscribers log and drop it). An event carrying
``reply_to`` (from :meth:`EventBus.publish_and_wait`) is a question instead: each
handler's answer - or error - is sent back and the event is acked.

Context: a handler may read its event's :class:`~amqp_agents.models.context.MessageContext`
(event id and type, attempt, headers...); an event published while a handler runs (of an
agent's action or of an event) carries ``x-causation-id``, the id of that message.

What happens to each delivery (dispatch, handler limits, settlement, redelivery
counting) is :mod:`amqp_agents.events.delivery`; this module owns publishing and the
subscriptions (groups, private queues, the recovery of their consumers). It is about
520 lines, a third of them this docstring, because both share the bus's lifecycle and
its reply queue (scatter-gather asks with :meth:`EventBus.publish_and_wait`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from amqp_agents.errors import (
    ConfigurationError,
    LifecycleError,
    QueueNotFoundError,
    TransportError,
    UnroutableError,
)
from amqp_agents.events.delivery import (
    ConsumedQueue,
    EventDelivery,
    EventHandler,
    QueueAttachment,
    Subscription,
)
from amqp_agents.models.context import maybe_context
from amqp_agents.models.messages import AgentResponse, Event, IdSource
from amqp_agents.models.schema import adapter_for, handler_argument
from amqp_agents.models.topic import validate_pattern
from amqp_agents.models.topology import HEADER_DEADLINE, Topology, check_name
from amqp_agents.models.wire import (
    decode_reply,
    dump_json,
    encode_event,
)
from amqp_agents.transport.base import (
    Delivery,
    ExchangeKind,
    Transport,
)
from amqp_agents.transport.recovery import Recovery
from amqp_agents.transport.replies import ReplyQueue

if TYPE_CHECKING:
    from amqp_agents.metrics import Metrics
    from amqp_agents.models.envelope import Envelope
    from amqp_agents.tracing import Tracing

__all__ = ["DeliveryGuard", "EventBus", "EventHandler", "Process", "Subscription"]

log = logging.getLogger(__name__)

Process = Callable[[Delivery], Awaitable[None]]
DeliveryGuard = Callable[[Delivery, Process], Awaitable[None]]
"""Wraps the processing of each delivery (the worker bounds concurrency with it)."""

Payload = BaseModel | dict[str, Any] | None


async def _run(delivery: Delivery, process: Process) -> None:
    await process(delivery)


class _State(Enum):
    NEW = "new"
    STARTED = "started"
    CLOSED = "closed"


class EventBus:
    """Publishes events and runs subscribed handlers over a transport.

    The bus does not own the transport. ``guard`` wraps every delivery's processing
    (the worker passes its concurrency limit and shutdown tracking); ``prefetch``
    bounds unsettled deliveries per queue; ``handler_timeout_s`` bounds each handler;
    ``max_deliveries`` bounds how often a group event may come back unsettled (a crash
    of its subscriber) before it is dead-lettered.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        topology: Topology | None = None,
        publish_timeout_s: float = 10.0,
        max_message_bytes: int = 1024 * 1024,
        prefetch: int = 16,
        handler_timeout_s: float = 60.0,
        guard: DeliveryGuard | None = None,
        metrics: Metrics | None = None,
        recovery: Recovery | None = None,
        max_deliveries: int = 5,
        tracing: Tracing | None = None,
    ) -> None:
        if tracing is not None:  # tracing: publishes, deliveries and settlements
            transport = tracing.wrap(transport)
        self._transport = transport
        self._metrics = metrics
        self._owns_recovery = recovery is None
        self._recovery = recovery or Recovery(transport, metrics=metrics)
        self._topology = topology or Topology()
        self._publish_timeout_s = publish_timeout_s
        self._max_bytes = max_message_bytes
        self._prefetch = prefetch
        self._delivery = EventDelivery(
            transport,
            topology=self._topology,
            metrics=metrics,
            publish_timeout_s=publish_timeout_s,
            handler_timeout_s=handler_timeout_s,
            max_deliveries=max_deliveries,
        )
        self._guard = guard or _run
        self._ids = IdSource()
        self._state = _State.NEW
        self._groups: dict[str, ConsumedQueue] = {}
        self._private: ConsumedQueue | None = None
        self._replies: ReplyQueue | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()

    @property
    def consumers(self) -> int:
        """Queues this bus is consuming right now."""
        return sum(
            1
            for q in self._queues()
            if q.attachment is not None
            and q.attachment.handle is not None
            and q.attachment.handle.attached.is_set()
        )

    @property
    def recovery(self) -> Recovery:
        """The owner of this bus's consumers (shared with its worker, if any)."""
        return self._recovery

    @property
    def subscriptions(self) -> list[Subscription]:
        """Every active subscription."""
        return [sub for q in self._queues() for sub in q.subscriptions]

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Declare the events exchange and its dead-letter exchange."""
        if self._state is not _State.NEW:
            raise LifecycleError(f"event bus is {self._state.value}; start() runs once")
        self._state = _State.STARTED
        await self._declare_exchanges()

    async def _declare_exchanges(self) -> None:
        await self._transport.declare_exchange(self._topology.events_exchange, ExchangeKind.TOPIC)
        await self._transport.declare_exchange(
            self._topology.events_dead_letter_exchange, ExchangeKind.DIRECT
        )

    def _queues(self) -> list[ConsumedQueue]:
        return [*self._groups.values(), *([self._private] if self._private else [])]

    async def stop_consuming(self) -> None:
        """Cancel every consumer (first step of a graceful stop); events stay queued."""
        for queue in self._queues():
            await self._cancel(queue)
        # The private queue is auto-deleted with its consumer: it and its bindings are gone.
        self._private = None

    async def aclose(self) -> None:
        """Stop consuming and stop waiting for replies. Idempotent."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        await self.stop_consuming()
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=10)
        if self._replies is not None:
            self._replies.drain()
            await self._replies.aclose()
        if self._owns_recovery:
            await self._recovery.aclose()  # leaves the transport's callbacks

    async def __aenter__(self) -> EventBus:
        """:meth:`start`; ``async with EventBus(transport) as bus:`` closes it after."""
        await self.start()
        return self

    async def __aexit__(self, *_exc_info: object) -> None:
        await self.aclose()

    # -- publishing ------------------------------------------------------------------

    async def publish(self, event_type: str, payload: Payload = None) -> str:
        """Publish an event and return its id once the broker has confirmed it.

        Raises:
            ConfigurationError: the event type is not a valid routing key.
            InvalidPayloadError: the payload is not JSON-serialisable.
            MessageTooLargeError: the encoded payload is over the size limit.
            TransportError: not confirmed in time, refused, or the link is down.
        """
        envelope = self._event(event_type, payload, correlation_id=None, reply_to=None)
        await self._transport.publish(envelope, timeout_s=self._publish_timeout_s)
        if self._metrics is not None:
            self._metrics.events_published.inc()
        return envelope.message_id or ""

    async def publish_and_wait(
        self,
        event_type: str,
        payload: Payload = None,
        *,
        timeout_s: float,
        expected: int | None = None,
    ) -> list[AgentResponse]:
        """Scatter-gather: publish a question, collect the answers of the handlers.

        Returns when ``expected`` replies have arrived, or at ``timeout_s`` with
        whatever arrived (possibly none). If no queue is bound for the event type at
        all, nobody can answer and it returns ``[]`` at once. Never waits longer
        than ``timeout_s``.
        """
        if not timeout_s > 0:
            raise ConfigurationError("timeout_s must be positive")
        if expected is not None and expected < 1:
            raise ConfigurationError("expected must be at least 1")
        replies = await self._reply_queue()
        correlation_id = self._ids.next()
        envelope = self._event(
            event_type, payload, correlation_id=correlation_id, reply_to=replies.name
        )
        # Nobody reads answers after the timeout: subscribers skip a question whose
        # deadline has passed. (Not an AMQP expiration: in a group queue an expired
        # message would be dead-lettered, and a stale question is not a failure.)
        envelope.headers = {
            **(envelope.headers or {}),
            HEADER_DEADLINE: int((time.time() + timeout_s) * 1000),
        }
        collected: list[AgentResponse] = []
        enough = asyncio.Event()

        def on_reply(reply: Envelope) -> None:
            collected.append(decode_reply(reply))
            if expected is not None and len(collected) >= expected:
                enough.set()

        replies.expect(correlation_id, on_reply)
        try:
            async with asyncio.timeout(timeout_s):
                try:
                    await self._transport.publish(
                        envelope, mandatory=True, timeout_s=self._publish_timeout_s
                    )
                except (UnroutableError, QueueNotFoundError):
                    return []
                await enough.wait()
        except TimeoutError:
            pass
        finally:
            replies.forget(correlation_id)
        return collected[:expected] if expected is not None else collected

    def _event(
        self,
        event_type: str,
        payload: Payload,
        *,
        correlation_id: str | None,
        reply_to: str | None,
    ) -> Envelope:
        if self._state is not _State.STARTED:
            raise LifecycleError(f"event bus is {self._state.value}; call start() first")
        try:
            check_name("event type", event_type)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        context = maybe_context()  # published by a handler: say which message caused it
        return encode_event(
            self._topology,
            event_type,
            b"{}" if payload is None else dump_json(payload),
            message_id=self._ids.next(),
            correlation_id=correlation_id,
            reply_to=reply_to,
            max_bytes=self._max_bytes,
            causation_id=None if context is None else context.message_id or None,
        )

    async def _reply_queue(self) -> ReplyQueue:
        async with self._lock:
            if self._replies is None:
                replies = ReplyQueue(self._recovery)
                await replies.start()
                self._replies = replies
            return self._replies

    # -- subscribing -----------------------------------------------------------------

    async def subscribe(
        self, pattern: str, handler: EventHandler, *, group: str | None = None
    ) -> Subscription:
        """Run ``handler`` for events whose type matches ``pattern``.

        ``group``: handlers sharing a group share the durable queue ``events.<group>``
        (each event handled once per group); ``None``: a private queue of this bus
        (each subscribed process gets every event while subscribed).

        The handler's one argument decides what it receives: a pydantic model (the
        payload, validated), :class:`~amqp_agents.models.messages.Event` (the whole
        event), anything else or unannotated (the payload dict); or no argument.
        """
        if self._state is not _State.STARTED:
            raise LifecycleError(f"event bus is {self._state.value}; call start() first")
        try:
            validate_pattern(pattern)
            if group is not None:
                check_name("group", group)
                if group.endswith(self._topology.dead_letter_suffix):
                    raise ConfigurationError(
                        f"group {group!r} ends with {self._topology.dead_letter_suffix!r}: its"
                        " queue would collide with another group's dead-letter queue"
                    )
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        annotation = handler_argument(handler, bound=False, what=f"event handler {pattern!r}")
        wants_event = annotation is Event
        subscription = Subscription(
            pattern=pattern,
            group=group,
            handler=handler,
            _adapter=None if annotation is None or wants_event else adapter_for(annotation),
            _wants_event=wants_event,
            _takes_argument=annotation is not None,
        )
        async with self._lock:
            queue = self._queue_for(group)
            queue.subscriptions.append(subscription)
            try:
                if queue.attachment is None:
                    await self._attach(queue)  # declares the queue and binds the pattern
                else:
                    await self._transport.bind_queue(
                        queue.queue, self._topology.events_exchange, pattern
                    )
            except BaseException:
                queue.subscriptions.remove(subscription)
                if not queue.subscriptions and queue.attachment is None:
                    self._drop(queue)
                raise
        return subscription

    async def _attach(self, queue: ConsumedQueue) -> None:
        attachment = QueueAttachment()

        async def declare() -> str:
            # Everything the queue needs, again after it was lost: the exchanges, the
            # queue (a new private one), and a binding per pattern subscribed now.
            await self._declare_exchanges()
            if queue.group is None:
                queue.queue = await self._declare_private()
            else:
                await self._declare_group(queue.group)
            for pattern in dict.fromkeys(s.pattern for s in queue.subscriptions):
                await self._transport.bind_queue(
                    queue.queue, self._topology.events_exchange, pattern
                )
            return queue.queue

        attachment.handle = await self._recovery.attach(
            declare,
            self._handler_for(queue, attachment),
            prefetch=self._prefetch,
            label=queue.queue if queue.group is not None else "private",
        )
        queue.attachment = attachment

    async def unsubscribe(self, subscription: Subscription) -> None:
        """Remove a handler; when it was its queue's last one, stop consuming.

        A group's queue and bindings stay, so events keep queuing for the group (other
        processes may serve it); while this process still consumes the group, events
        that none of its remaining handlers match are dead-lettered, not dropped. A
        private queue drops the pattern's binding once no handler uses it, and
        disappears with its last handler.
        """
        async with self._lock:
            queue = (
                self._private
                if subscription.group is None
                else self._groups.get(subscription.group)
            )
            if queue is None or subscription not in queue.subscriptions:
                return
            queue.subscriptions.remove(subscription)
            still_used = any(s.pattern == subscription.pattern for s in queue.subscriptions)
            if queue.group is None and not still_used and queue.subscriptions:
                await self._transport.unbind_queue(
                    queue.queue, self._topology.events_exchange, subscription.pattern
                )
            if not queue.subscriptions:
                await self._cancel(queue)
                self._drop(queue)

    def _queue_for(self, group: str | None) -> ConsumedQueue:
        """The queue of a group (or the private one); declared when first attached."""
        if group is None:
            if self._private is None:
                self._private = ConsumedQueue(queue="", group=None)
            return self._private
        queue = self._groups.get(group)
        if queue is None:
            queue = ConsumedQueue(queue=self._topology.group_queue(group), group=group)
            self._groups[group] = queue
        return queue

    def _drop(self, queue: ConsumedQueue) -> None:
        if queue.group is None:
            self._private = None
        else:
            self._groups.pop(queue.group, None)

    async def _declare_private(self) -> str:
        return await self._transport.declare_queue(self._topology.private_queue_spec())

    async def _declare_group(self, group: str) -> str:
        topology = self._topology
        dlx = topology.events_dead_letter_exchange
        dead = await self._transport.declare_queue(topology.group_dead_letter_spec(group))
        await self._transport.bind_queue(dead, dlx, group)
        return await self._transport.declare_queue(topology.group_queue_spec(group))

    async def _cancel(self, queue: ConsumedQueue) -> None:
        attachment, queue.attachment = queue.attachment, None
        if attachment is None or attachment.handle is None:
            return
        attachment.cancelled = True
        with contextlib.suppress(TransportError):
            await attachment.handle.cancel()
        self._recovery.forget(attachment.handle)
        if attachment.in_flight == 0:
            await self._close(attachment)

    async def _close(self, attachment: QueueAttachment) -> None:
        if attachment.closed or attachment.handle is None:
            return
        attachment.closed = True
        await attachment.handle.close()

    # -- delivering ------------------------------------------------------------------

    def _handler_for(
        self, queue: ConsumedQueue, attachment: QueueAttachment
    ) -> Callable[[Delivery], Awaitable[None]]:
        async def process(delivery: Delivery) -> None:
            await self._delivery.dispatch(queue, attachment, delivery)

        async def on_delivery(delivery: Delivery) -> None:
            attachment.in_flight += 1
            try:
                await self._guard(delivery, process)
            finally:
                attachment.in_flight -= 1
                if attachment.cancelled and attachment.in_flight == 0 and not attachment.closed:
                    # Not awaited here: closing a channel cancels its consumer tasks,
                    # and this is one of them.
                    task = asyncio.get_running_loop().create_task(self._close(attachment))
                    self._closing.add(task)
                    task.add_done_callback(self._closing.discard)

        return on_delivery

    def stuck_tries(self, grace_s: float) -> list[asyncio.Task[object]]:
        """Tasks of handlers cut off by their time limit more than ``grace_s`` ago that
        still run (they ignore cancellation): a worker's watchdog lets them go."""
        return self._delivery.stuck_tries(grace_s)
