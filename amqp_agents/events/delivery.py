"""Event delivery: what a subscriber does with one event, from decoding to settlement.

Private to :mod:`amqp_agents.events`; :class:`~amqp_agents.events.bus.EventBus` owns the
queues and their consumers and hands each delivery to :meth:`EventDelivery.dispatch`:

* a delivery that arrives after its subscription was cancelled goes back (requeued);
* a group event delivered before and never settled is counted in the message
  (``x-attempt`` + 1) or, past ``max_deliveries``, dead-lettered: an event that kills
  its subscriber must not loop;
* a question (``reply_to``) whose asker stopped waiting is acked unanswered;
* otherwise every matching handler runs under its time limit (a
  :class:`~amqp_agents.bounds.TimeLimits` entry, which the worker's watchdog reads), in
  the event's message context; answers go back to a question's asker; a failed plain
  event is rejected to its group's dead-letter queue, anything else acked.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from amqp_agents.bounds import TimeLimits
from amqp_agents.errors import AgentError, ErrorCode, InvalidPayloadError, TransportError
from amqp_agents.metrics import DeliveryOutcome
from amqp_agents.models.context import event_scope
from amqp_agents.models.messages import AgentResponse
from amqp_agents.models.rewrites import attempt_from
from amqp_agents.models.schema import validate_payload
from amqp_agents.models.topic import topic_matches
from amqp_agents.models.topology import HEADER_ATTEMPT
from amqp_agents.models.wire import deadline_from, decode_event, encode_reply

if TYPE_CHECKING:
    import asyncio

    from pydantic import TypeAdapter

    from amqp_agents.metrics import Metrics
    from amqp_agents.models.envelope import Envelope
    from amqp_agents.models.messages import Event
    from amqp_agents.models.topology import Topology
    from amqp_agents.transport.base import Delivery, Transport
    from amqp_agents.transport.recovery import Attachment

__all__ = ["ConsumedQueue", "EventDelivery", "EventHandler", "QueueAttachment", "Subscription"]

log = logging.getLogger("amqp_agents.events.bus")

EventHandler = Callable[..., Awaitable[Any]]
"""``async def handler(payload: Model | Event | dict) -> Any``; or no argument."""


@dataclass(eq=False, slots=True)
class Subscription:
    """A handler subscribed to a pattern; pass it to :meth:`EventBus.unsubscribe`."""

    pattern: str
    group: str | None
    handler: EventHandler
    _adapter: TypeAdapter[Any] | None
    _wants_event: bool
    _takes_argument: bool


@dataclass(eq=False, slots=True)
class QueueAttachment:
    """One subscription of a queue: its recovered consumer and the deliveries still
    being handled.

    Once cancelled, its channel is closed as soon as no delivery of it is in flight
    (closing earlier would requeue them unsettled; never closing leaks channels).
    """

    handle: Attachment | None = None
    in_flight: int = 0
    cancelled: bool = False
    closed: bool = False


@dataclass(eq=False, slots=True)
class ConsumedQueue:
    """One consumed queue (a group's, or this bus's private one) and its handlers."""

    queue: str
    group: str | None
    subscriptions: list[Subscription] = field(default_factory=list)
    attachment: QueueAttachment | None = None


class EventDelivery:
    """Runs the subscribed handlers of one bus for each delivery, and settles it."""

    def __init__(
        self,
        transport: Transport,
        *,
        topology: Topology,
        metrics: Metrics | None,
        publish_timeout_s: float,
        handler_timeout_s: float,
        max_deliveries: int,
    ) -> None:
        self._transport = transport
        self._topology = topology
        self._metrics = metrics
        self._publish_timeout_s = publish_timeout_s
        self._handler_timeout_s = handler_timeout_s
        self._max_deliveries = max_deliveries
        self._limits = TimeLimits()

    async def dispatch(
        self, queue: ConsumedQueue, attachment: QueueAttachment, delivery: Delivery
    ) -> None:
        """Handle one delivery of ``queue`` and settle it (see the module docstring)."""
        envelope = delivery.envelope
        if attachment.cancelled:
            # Arrived after unsubscribe/stop: give it back for the group's next consumer.
            await delivery.nack(requeue=True)
            return
        if envelope.redelivered and queue.group is not None and not envelope.reply_to:
            await self._count_redelivery(queue, delivery)
            return
        if envelope.reply_to:
            deadline = deadline_from(envelope)
            if deadline is not None and deadline < time.time():
                log.info("skipping question %r: its asker stopped waiting", envelope.routing_key)
                await delivery.ack()
                return
        try:
            event = decode_event(envelope)
        except InvalidPayloadError as exc:
            log.warning(
                "undecodable event %r on %s: %s", envelope.routing_key, queue.queue, exc.message
            )
            await self._answer(envelope, [AgentResponse.from_error(exc)])
            await self._settle(delivery, envelope, failed=True, group=queue.group)
            return
        # Match on the routing key as published to the events exchange; a message that
        # arrives another way (a dead letter moved back by a shovel or the management UI
        # keeps its type but not its routing key) is matched on its type.
        key = (
            envelope.routing_key
            if envelope.exchange == self._topology.events_exchange
            else event.type
        )
        subscriptions = [s for s in queue.subscriptions if topic_matches(s.pattern, key)]
        if not subscriptions:
            log.warning("no handler on %s matches event %r", queue.queue, envelope.routing_key)
            await self._settle(delivery, envelope, failed=True, group=queue.group)
            return
        with event_scope(envelope, event.type):  # the handlers' message context
            responses = [await self._call(subscription, event) for subscription in subscriptions]
        await self._answer(envelope, [r for r in responses if r is not None])
        failed = any(r is not None and not r.ok for r in responses)
        await self._settle(delivery, envelope, failed=failed, group=queue.group)

    async def _count_redelivery(self, queue: ConsumedQueue, delivery: Delivery) -> None:
        """A group event delivered before and never settled may have crashed its
        handler's process: count it in the message (a copy with ``x-attempt`` + 1, then
        ack) or, past ``max_deliveries``, dead-letter it. Without this an event that
        kills its subscriber would loop forever on the group queue."""
        envelope = delivery.envelope
        attempt = attempt_from(envelope) + 1
        if attempt > self._max_deliveries:
            log.error(
                "event %r on %s was delivered %d times without being settled (it may crash"
                " its handler); dead-lettered",
                envelope.routing_key,
                queue.queue,
                attempt - 1,
            )
            await delivery.reject()
            self.count(queue.group, DeliveryOutcome.DEAD_LETTERED)
            return
        copy = dataclasses.replace(
            envelope,
            exchange="",
            routing_key=queue.queue,
            headers={**(envelope.headers or {}), HEADER_ATTEMPT: attempt},
            redelivered=False,
        )
        try:
            await self._transport.publish(copy, mandatory=True, timeout_s=self._publish_timeout_s)
        except TransportError as exc:
            log.warning("could not count a redelivered event on %s (%s)", queue.queue, exc)
            await delivery.nack(requeue=True)
            return
        await delivery.ack()

    def count(self, group: str | None, outcome: DeliveryOutcome) -> None:
        """One event handled, in the ``events_consumed`` counter."""
        if self._metrics is not None:
            self._metrics.child(
                self._metrics.events_consumed, group or "private", outcome.value
            ).inc()

    async def _call(self, subscription: Subscription, event: Event) -> AgentResponse | None:
        """Run one handler; its answer, an error response, or None (no answer).

        Its time limit is a :class:`~amqp_agents.bounds.TimeLimits` entry, so that
        :meth:`stuck_tries` lets a worker's watchdog find a handler that ignores the
        cancellation.
        """
        guard = self._limits.arm(self._handler_timeout_s)
        try:
            if subscription._wants_event:
                call = subscription.handler(event)
            elif subscription._adapter is not None:
                call = subscription.handler(validate_payload(subscription._adapter, event.payload))
            elif subscription._takes_argument:
                call = subscription.handler(event.payload)
            else:
                call = subscription.handler()
            result = await call
        except BaseException as exc:
            if guard.end(exc):
                log.warning(
                    "event handler for %r took longer than %gs",
                    event.type,
                    self._handler_timeout_s,
                )
                return AgentResponse.failure(
                    ErrorCode.TIMEOUT, f"handler took longer than {self._handler_timeout_s:g}s"
                )
            if isinstance(exc, AgentError):
                log.warning(
                    "event handler for %r failed: %s: %s", event.type, exc.code, exc.message
                )
                return AgentResponse.from_error(exc)
            if not isinstance(exc, Exception):
                raise  # a cancellation from elsewhere (a stop), or an exit
            log.exception("event handler for %r failed (event id %s)", event.type, event.id)
            return AgentResponse.failure(
                ErrorCode.INTERNAL_ERROR, "the event handler failed; see the subscriber's log"
            )
        guard.end(None)
        return None if result is None else AgentResponse.success(result)

    def stuck_tries(self, grace_s: float) -> list[asyncio.Task[object]]:
        """Tasks of handlers cut off by their time limit more than ``grace_s`` ago that
        still run (they ignore cancellation): a worker's watchdog lets them go."""
        return [limit.task for limit in self._limits.overdue(grace_s)]

    async def _answer(self, envelope: Envelope, responses: list[AgentResponse]) -> None:
        reply_to = envelope.reply_to
        if not reply_to:
            return
        for response in responses:
            reply = encode_reply(response, reply_to, envelope.correlation_id)
            try:
                await self._transport.publish(reply, timeout_s=self._publish_timeout_s)
            except TransportError as exc:
                log.warning("answer to %s not sent: %s", reply_to, exc)

    async def _settle(
        self, delivery: Delivery, envelope: Envelope, *, failed: bool, group: str | None
    ) -> None:
        # A question (reply_to) was answered, errors included: done. A failed plain
        # event goes to the dead-letter queue rather than back into the queue.
        if failed and not envelope.reply_to:
            await delivery.reject()
            outcome = DeliveryOutcome.DEAD_LETTERED
        else:
            await delivery.ack()
            outcome = DeliveryOutcome.ERROR if failed else DeliveryOutcome.OK
        self.count(group, outcome)
