"""The request pipeline: what a worker does with one delivery of an agent's queue.

In order: a request whose caller's deadline has passed is acked unanswered (counted);
a redelivery is counted as an attempt first (it may have crashed a worker); an
oversized or undecodable request is answered and dead-lettered; otherwise the agent
runs it (tries, time limits, in-process retries; its message context set, see
:mod:`~amqp_agents.models.context`) and the outcome is settled: replied
and acked, redelivered later through a retry tier, or failed (and dead-lettered when it
crashed or ran out of attempts). Every settlement goes through
:class:`~amqp_agents.runtime.settle.Settlement`, which owns what happens when the
broker refuses one. Admission (slots, the watchdog, giving back) happens before this,
in :mod:`~amqp_agents.runtime.admission`.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Final

from amqp_agents.errors import ErrorCode, InvalidPayloadError, MessageTooLargeError
from amqp_agents.metrics import DeliveryOutcome
from amqp_agents.models.context import request_scope
from amqp_agents.models.messages import AgentResponse
from amqp_agents.models.rewrites import attempt_from
from amqp_agents.models.wire import deadline_from, read_request
from amqp_agents.runtime.settle import action_label, log_fields

if TYPE_CHECKING:
    from amqp_agents.config import WorkerSettings
    from amqp_agents.metrics import Metrics
    from amqp_agents.runtime.agent import Agent
    from amqp_agents.runtime.settle import Settlement, WorkerStats
    from amqp_agents.transport.base import Delivery

__all__ = ["RequestPipeline"]

log = logging.getLogger("amqp_agents.runtime.worker")

_ANSWER_RESERVE_S: Final = 0.2
"""Time kept back from a caller's deadline (at most a tenth of it) for the answer."""


class RequestPipeline:
    """Runs requests of the worker's agents and settles each one exactly once."""

    def __init__(
        self,
        settle: Settlement,
        *,
        settings: WorkerSettings,
        stats: WorkerStats,
        metrics: Metrics | None,
        max_message_bytes: int,
    ) -> None:
        self._settle = settle
        self._settings = settings
        self.stats = stats
        self._metrics = metrics
        self._max_bytes = max_message_bytes

    async def process(self, agent: Agent, delivery: Delivery) -> None:
        """Take one request through to its settlement (see the module docstring)."""
        envelope = delivery.envelope
        deadline = deadline_from(envelope)
        timeout_s = self._settings.action_timeout_s
        if deadline is not None:
            remaining = deadline - time.time()
            if remaining <= 0:
                self.stats.expired += 1
                log.info(
                    "dropping %s.%s: its caller's deadline passed (correlation id %s)",
                    agent.name,
                    envelope.type,
                    envelope.correlation_id,
                    extra=log_fields(agent, envelope, DeliveryOutcome.EXPIRED),
                )
                await delivery.ack()
                self._settle.count(agent, envelope.type, DeliveryOutcome.EXPIRED)
                return
            # Work stops a little before the caller's deadline: the answer (and a
            # dead letter) must still be published and travel back in time.
            remaining -= min(_ANSWER_RESERVE_S, remaining / 10)
            timeout_s = min(timeout_s, remaining)
        work_until = None if deadline is None else time.monotonic() + remaining
        if envelope.redelivered:
            # Delivered before and never settled: maybe it crashed the worker. Count it
            # as an attempt *in the message* (republish, then ack), or a message that
            # kills the process would loop forever.
            await self._settle.count_redelivery(agent, delivery, attempt_from(envelope) + 1)
            return
        if len(envelope.body) > self._max_bytes:
            attempt = attempt_from(envelope)
            too_large = MessageTooLargeError(
                f"the request is {len(envelope.body)} bytes, over the {self._max_bytes}-byte limit"
            )
            await self._settle.fail(
                agent, delivery, AgentResponse.from_error(too_large), attempt, dead_letter=True
            )
            return
        try:
            message = read_request(envelope)
        except InvalidPayloadError as exc:
            self.stats.invalid += 1
            log.warning(
                "invalid request for %s (correlation id %s): %s",
                agent.name,
                envelope.correlation_id,
                exc.message,
                extra=log_fields(agent, envelope, DeliveryOutcome.DEAD_LETTERED, exc.code),
            )
            await self._settle.fail(
                agent,
                delivery,
                AgentResponse.from_error(exc),
                attempt_from(envelope),
                dead_letter=True,
            )
            return
        metrics = self._metrics
        started = 0.0 if metrics is None else time.perf_counter()
        policy = agent.retry_policy(message.action, self._settings.retry)  # once per request
        # The handler's context (and that of the calls it makes) is this delivery's.
        with request_scope(envelope, agent.name):
            outcome = await agent.run(
                message, timeout_s=timeout_s, policy=policy, deadline=work_until
            )
        if metrics is not None:
            action = action_label(agent, message.action)
            metrics.child(metrics.handler_duration, agent.name, action).observe(
                time.perf_counter() - started
            )
            if not outcome.ok and outcome.response.code == ErrorCode.TIMEOUT:
                metrics.child(metrics.handler_timeouts, agent.name, action).inc()
        if outcome.ok:
            await self._settle.reply_and_ack(agent, delivery, outcome)
            return
        response = outcome.response
        assert response.error is not None  # noqa: S101  # not ok: an error reply
        if not outcome.retryable:
            crashed = response.error.code == ErrorCode.INTERNAL_ERROR
            attempt = attempt_from(envelope)
            await self._settle.fail(agent, delivery, response, attempt, dead_letter=crashed)
            return
        attempt = attempt_from(envelope)
        if attempt < policy.max_deliveries:
            delay_ms = policy.redelivery_delay_ms(attempt, outcome.delay_s)
            if deadline is None or time.time() + delay_ms / 1000 < deadline:
                await self._settle.redeliver_later(agent, delivery, response, attempt + 1, delay_ms)
                return
        await self._settle.fail(agent, delivery, outcome.response, attempt, dead_letter=True)
