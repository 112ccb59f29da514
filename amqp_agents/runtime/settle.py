"""The worker's settlement table: what each outcome publishes, and what happens when
the broker refuses that publish. The one place this is decided.

The table and :class:`Settlement`, which carries it out, share this module (about 490
lines) on purpose: a change to a row is a change to both, reviewed together.

Each outcome publishes at most one message of the worker's own (confirmed), then
settles the delivery. "Refused" is the broker's answer about *this* message (a nack
from a full ``reject-publish`` queue, 403, 404 no exchange, unroutable), so sending it
again unchanged cannot help; "not sent" is about the link (lost, blocked, no confirm
in time), which comes back ("unsent" below)::

    outcome           publishes                    then         refused                      unsent
    ----------------  ---------------------------  -----------  ---------------------------  -------
    reply             reply to reply_to            ack          reply DROPPED, request       requeue
                                                                acked (the work is done;
                                                                running it again cannot
                                                                make the reply deliverable)
    retry later       copy to agents.A.retry.<ms>  ack          tier declared again, sent    requeue
                      (mandatory)                               once more; then dead-letter
    count redelivery  copy to the first tier       ack          tier declared again, sent    requeue
                      (mandatory)                               once more; then held, requeue
    dead-letter       copy via agents.dlx          reply + ack  dlx, queue, binding declared requeue
                      (mandatory)                               again, sent once more; then
                                                                held hold_s, requeued
    expired           nothing                      ack
    stop, unstarted   nothing                      requeue

"Held" means the delivery keeps its slot for ``hold_s`` before it goes back: a copy
the broker keeps refusing comes back slowly, never in a hot loop. A requeued request
comes back redelivered and counts as an attempt, so none of this repeats without end
unless the broker keeps refusing the dead-letter queue itself. Every refusal is logged
with the queue or exchange, the broker's reason and the correlation id, and counted in
``messages_handled_total{outcome}`` (``reply_dropped``, ``requeued``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from amqp_agents.errors import (
    AccessRefusedError,
    InternalError,
    InvalidPayloadError,
    MessageTooLargeError,
    PublishRejectedError,
    QueueNotFoundError,
    TransportError,
    UnroutableError,
)
from amqp_agents.metrics import DeliveryOutcome, code_label
from amqp_agents.models.messages import AgentResponse
from amqp_agents.models.rewrites import dead_letter_envelope, retry_envelope
from amqp_agents.models.wire import encode_reply, encode_success
from amqp_agents.runtime.agent import Outcome
from amqp_agents.transport.base import ExchangeKind

if TYPE_CHECKING:
    from amqp_agents.config import WorkerSettings
    from amqp_agents.metrics import Metrics
    from amqp_agents.models.envelope import Envelope
    from amqp_agents.models.topology import Topology
    from amqp_agents.runtime.agent import Agent
    from amqp_agents.transport.base import Delivery, Transport

__all__ = [
    "REFUSALS",
    "Settlement",
    "Verdict",
    "WorkerStats",
    "action_label",
    "log_fields",
    "publish_control",
]

log = logging.getLogger(__name__)

REFUSALS: tuple[type[TransportError], ...] = (
    UnroutableError,
    QueueNotFoundError,
    AccessRefusedError,
    PublishRejectedError,
)
"""The broker's "no" to one message: no route, no exchange, not permitted, nacked."""


class Verdict(StrEnum):
    """What became of a control publish."""

    SENT = "sent"
    """Confirmed by the broker (and routed, when mandatory)."""
    REFUSED = "refused"
    """The broker refused this message (even after a repair)."""
    NOT_SENT = "not_sent"
    """The link, an alarm or a timeout: it may or may not have been sent; may work later."""


Repair = Callable[[], Awaitable[None]]


async def publish_control(
    transport: Transport,
    envelope: Envelope,
    *,
    mandatory: bool,
    timeout_s: float,
    repair: Repair | None = None,
) -> tuple[Verdict, TransportError | None]:
    """Publish one of the worker's own messages and classify the outcome.

    A refusal with a ``repair`` (re-declare what the message needs) is repaired once
    and published once more; never more (no loop). Returns the verdict and the last
    error (``None`` when sent).
    """
    for attempt in (1, 2):
        try:
            await transport.publish(envelope, mandatory=mandatory, timeout_s=timeout_s)
        except REFUSALS as exc:
            if attempt == 2 or repair is None:
                return Verdict.REFUSED, exc
            log.warning(
                "publish to %r (key %r) refused (%s); declaring its topology again",
                envelope.exchange,
                envelope.routing_key,
                exc,
            )
            try:
                await repair()
            except TransportError as repair_failed:
                return Verdict.REFUSED, repair_failed
        except TransportError as exc:
            return Verdict.NOT_SENT, exc
        else:
            return Verdict.SENT, None
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(slots=True)
class WorkerStats:
    """Counters since start (the Prometheus metrics mirror them)."""

    received: int = 0
    replied: int = 0
    acked_without_reply: int = 0
    invalid: int = 0
    expired: int = 0
    requeued: int = 0
    retried: int = 0
    dead_lettered: int = 0
    in_flight: int = 0


class Settlement:
    """Carries out the table above for one worker: publishes what an outcome needs,
    settles the delivery, counts it (``stats`` and metrics, in one place each)."""

    def __init__(
        self,
        transport: Transport,
        *,
        topology: Topology,
        settings: WorkerSettings,
        metrics: Metrics | None,
        publish_timeout_s: float,
        max_message_bytes: int,
        stats: WorkerStats,
    ) -> None:
        self._transport = transport
        self._topology = topology
        self._settings = settings
        self._metrics = metrics
        self._publish_timeout_s = publish_timeout_s
        self._max_bytes = max_message_bytes
        self.stats = stats
        self.retry_queues: set[str] = set()
        """Delay tiers declared so far (declared again when a copy to one is refused)."""
        self._hold_s = 1.0
        """How long a delivery whose copy the broker keeps refusing is held before it is
        requeued."""

    def count(self, agent: Agent, action: str | None, outcome: DeliveryOutcome) -> None:
        if self._metrics is not None:
            label = action_label(agent, action)
            self._metrics.child(
                self._metrics.messages_handled, agent.name, label, outcome.value
            ).inc()

    async def requeue(self, delivery: Delivery) -> None:
        self.stats.requeued += 1
        await delivery.nack(requeue=True)

    async def requeue_counted(self, agent: Agent, delivery: Delivery) -> None:
        await self.requeue(delivery)
        self.count(agent, delivery.envelope.type, DeliveryOutcome.REQUEUED)

    async def _hold_then_requeue(self, agent: Agent, delivery: Delivery) -> None:
        """Give a delivery back after a pause: a copy the broker keeps refusing comes
        back slowly (``hold_s``), never in a hot loop."""
        await asyncio.sleep(self._hold_s)
        await self.requeue_counted(agent, delivery)

    async def reply_and_ack(
        self, agent: Agent, delivery: Delivery, answer: AgentResponse | Outcome
    ) -> bool:
        """Reply (if asked to), then ack. False if the reply was not sent (requeued).

        ``answer``: an error reply, or a successful outcome (encoded from its data). A
        reply the broker refuses is dropped and the request acked (see
        :mod:`~amqp_agents.runtime.settle`).
        """
        envelope = delivery.envelope
        reply_to = envelope.reply_to
        dropped = False
        if reply_to:
            error: TransportError | None = None
            if self._topology.may_reply_to(reply_to):
                reply = self._encode_reply(agent, answer, reply_to, envelope.correlation_id)
                # The hot path: publish_control's classification, inlined (no repair).
                try:
                    await self._transport.publish(reply, timeout_s=self._publish_timeout_s)
                except TransportError as exc:
                    error = exc
                    verdict = Verdict.REFUSED if isinstance(exc, REFUSALS) else Verdict.NOT_SENT
                else:
                    verdict = Verdict.SENT
            else:
                verdict = Verdict.REFUSED
                error = AccessRefusedError(
                    f"reply_to {reply_to[:80]!r} names an agent or event queue, or is too long"
                )
            if verdict is Verdict.NOT_SENT:
                # Not acked: the broker redelivers the request (at-least-once).
                log.warning(
                    "reply to %s not confirmed (%s); request requeued (correlation id %s)",
                    reply_to,
                    error,
                    envelope.correlation_id,
                    extra=log_fields(agent, envelope, DeliveryOutcome.REQUEUED),
                )
                await self.requeue_counted(agent, delivery)
                return False
            if verdict is Verdict.REFUSED:
                dropped = True
                log.warning(
                    "reply to %s refused by the broker (%s); reply dropped, request acked"
                    " (correlation id %s)",
                    reply_to,
                    error,
                    envelope.correlation_id,
                    extra=log_fields(agent, envelope, DeliveryOutcome.REPLY_DROPPED),
                )
            else:
                self.stats.replied += 1
        else:
            self.stats.acked_without_reply += 1
        await delivery.ack()
        if self._metrics is not None:
            action = action_label(agent, envelope.type)
            error_info = None if isinstance(answer, Outcome) else answer.error
            if dropped:
                outcome = DeliveryOutcome.REPLY_DROPPED
            else:
                outcome = DeliveryOutcome.OK if error_info is None else DeliveryOutcome.ERROR
            self._metrics.child(self._metrics.messages_handled, agent.name, action, outcome).inc()
            if error_info is not None:
                self._metrics.child(
                    self._metrics.error_replies, agent.name, action, code_label(error_info.code)
                ).inc()
        return True

    async def fail(
        self,
        agent: Agent,
        delivery: Delivery,
        response: AgentResponse,
        attempt: int,
        *,
        dead_letter: bool,
    ) -> None:
        """Dead-letter the request with the reason, then answer the caller and ack."""
        envelope = delivery.envelope
        error = response.error
        if dead_letter and error is not None:
            dead = dead_letter_envelope(
                envelope,
                exchange=self._topology.requests_dead_letter_exchange,
                routing_key=agent.name,
                code=error.code,
                message=error.message,
                attempt=attempt,
            )
            verdict, failure = await publish_control(
                self._transport,
                dead,
                mandatory=True,
                timeout_s=self._publish_timeout_s,
                repair=functools.partial(self.declare_dead_letters, agent),
            )
            if verdict is not Verdict.SENT:
                log.warning(
                    "could not dead-letter a request of %s to %s (%s: %s); %s (correlation id %s)",
                    agent.name,
                    self._topology.agent_dead_letter_queue(agent.name),
                    verdict.value,
                    failure,
                    "requeued" if verdict is Verdict.NOT_SENT else f"requeued in {self._hold_s:g}s",
                    envelope.correlation_id,
                    extra=log_fields(agent, envelope, DeliveryOutcome.REQUEUED, error.code),
                )
                if verdict is Verdict.REFUSED:
                    await self._hold_then_requeue(agent, delivery)
                else:
                    await self.requeue_counted(agent, delivery)
                return
            self.stats.dead_lettered += 1
            if self._metrics is not None:
                self._metrics.child(
                    self._metrics.dead_letters, agent.name, code_label(error.code)
                ).inc()
            # INTERNAL_ERROR's message names the correlation id already: not twice.
            cid = envelope.correlation_id
            said = f" (correlation id {cid})" if cid and cid not in error.message else ""
            log.warning(
                "dead-lettered %s.%s after %d attempt(s): %s %s%s",
                agent.name,
                envelope.type,
                attempt,
                error.code,
                error.message,
                said,
                extra=log_fields(agent, envelope, DeliveryOutcome.DEAD_LETTERED, error.code),
            )
        await self.reply_and_ack(agent, delivery, response)

    async def redeliver_later(
        self, agent: Agent, delivery: Delivery, response: AgentResponse, attempt: int, delay_ms: int
    ) -> None:
        """Republish to the delay tier (its TTL brings it back to work), then ack."""
        verdict, failure = await self._to_retry_tier(agent, delivery, attempt, delay_ms)
        if verdict is Verdict.REFUSED:
            log.warning(
                "the retry queue of %s refused a retry (%s); dead-lettering (correlation id %s)",
                agent.name,
                failure,
                delivery.envelope.correlation_id,
            )
            await self.fail(agent, delivery, response, attempt - 1, dead_letter=True)
            return
        if verdict is Verdict.NOT_SENT:
            log.warning("could not schedule a retry for %s (%s); requeued", agent.name, failure)
            await self.requeue_counted(agent, delivery)
            return
        self.stats.retried += 1
        if self._metrics is not None:
            action = action_label(agent, delivery.envelope.type)
            self._metrics.child(self._metrics.retries, agent.name, action).inc()
            self._metrics.child(
                self._metrics.messages_handled, agent.name, action, DeliveryOutcome.RETRIED
            ).inc()
        log.info(
            "retrying %s.%s in %d ms (attempt %d, correlation id %s)",
            agent.name,
            delivery.envelope.type,
            delay_ms,
            attempt,
            delivery.envelope.correlation_id,
            extra=log_fields(agent, delivery.envelope, DeliveryOutcome.RETRIED),
        )
        await delivery.ack()

    async def _to_retry_tier(
        self, agent: Agent, delivery: Delivery, attempt: int, delay_ms: int
    ) -> tuple[Verdict, TransportError | None]:
        """Publish a copy as ``attempt`` to the ``delay_ms`` tier (mandatory: a deleted
        tier is declared again, not a copy confirmed into nowhere)."""
        try:
            queue = await self._retry_queue(agent, delay_ms)
        except TransportError as exc:
            return Verdict.NOT_SENT, exc
        again = retry_envelope(delivery.envelope, queue=queue, attempt=attempt)

        async def repair() -> None:
            self.retry_queues.discard(queue)
            await self._retry_queue(agent, delay_ms)

        return await publish_control(
            self._transport,
            again,
            mandatory=True,
            timeout_s=self._publish_timeout_s,
            repair=repair,
        )

    async def count_redelivery(self, agent: Agent, delivery: Delivery, attempt: int) -> None:
        policy = agent.retry_policy(delivery.envelope.type, self._settings.retry)
        if attempt > policy.max_deliveries:
            crashed = InternalError(
                f"delivered {attempt - 1} times without being settled: it may crash the worker"
            )
            await self.fail(
                agent, delivery, AgentResponse.from_error(crashed), attempt - 1, dead_letter=True
            )
            return
        # Back through the first delay tier, not straight to the work queue: with
        # concurrency above one the copy could otherwise be delivered (and crash the
        # process again) before the ack of this delivery reached the broker, and both
        # would come back: the crash count would multiply requests instead of ending them.
        verdict, failure = await self._to_retry_tier(agent, delivery, attempt, policy.tiers_ms()[0])
        if verdict is not Verdict.SENT:
            log.warning("could not count a redelivery for %s (%s)", agent.name, failure)
            if verdict is Verdict.REFUSED:
                await self._hold_then_requeue(agent, delivery)
            else:
                await self.requeue_counted(agent, delivery)
            return
        await delivery.ack()

    async def _retry_queue(self, agent: Agent, delay_ms: int) -> str:
        """Declare (once) the delay tier of ``agent``: TTL, then back to the work queue."""
        topology = self._topology
        name = topology.agent_retry_queue(agent.name, delay_ms)
        if name not in self.retry_queues:
            await self._transport.declare_queue(topology.agent_retry_spec(agent.name, delay_ms))
            self.retry_queues.add(name)
        return name

    async def declare_dead_letters(self, agent: Agent) -> None:
        """The dead-letter exchange and the agent's dead-letter queue and binding."""
        topology = self._topology
        dlx = topology.requests_dead_letter_exchange
        await self._transport.declare_exchange(dlx, ExchangeKind.DIRECT)
        dead = await self._transport.declare_queue(topology.agent_dead_letter_spec(agent.name))
        await self._transport.bind_queue(dead, dlx, agent.name)

    def _encode_reply(
        self,
        agent: Agent,
        answer: AgentResponse | Outcome,
        reply_to: str,
        correlation_id: str | None,
    ) -> Envelope:
        try:
            if isinstance(answer, Outcome):
                reply = encode_success(answer.data, reply_to, correlation_id)
            else:
                reply = encode_reply(answer, reply_to, correlation_id)
        except InvalidPayloadError as exc:
            log.error("%s returned a value that is not JSON: %s", agent.name, exc.message)
            failure = InternalError("the action returned a value that cannot be sent as JSON")
            return encode_reply(AgentResponse.from_error(failure), reply_to, correlation_id)
        if len(reply.body) > self._max_bytes:
            log.error("%s: reply of %d bytes is over the limit", agent.name, len(reply.body))
            too_large = MessageTooLargeError(
                f"the reply is {len(reply.body)} bytes, over the {self._max_bytes}-byte limit"
            )
            return encode_reply(AgentResponse.from_error(too_large), reply_to, correlation_id)
        return reply


def log_fields(
    agent: Agent, envelope: Envelope, outcome: DeliveryOutcome, code: str | None = None
) -> dict[str, str | None]:
    """Structured log fields (JSON logs show them as keys)."""
    return {
        "agent": agent.name,
        "action": action_label(agent, envelope.type),
        "correlation_id": envelope.correlation_id,
        "outcome": outcome.value,
        "code": code,
    }


def action_label(agent: Agent, action: str | None) -> str:
    """The action as a bounded label: declared actions only."""
    return action if action is not None and action in agent.action_names else "other"
