"""The worker's settlement table: what each outcome publishes, and what happens when
the broker refuses that publish. The one place this is decided.

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

import logging
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import TYPE_CHECKING

from amqp_agents.errors import (
    AccessRefusedError,
    PublishRejectedError,
    QueueNotFoundError,
    TransportError,
    UnroutableError,
)

if TYPE_CHECKING:
    from amqp_agents.models.envelope import Envelope
    from amqp_agents.transport.base import Transport

__all__ = ["REFUSALS", "Verdict", "publish_control"]

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
