"""How a request is rewritten on its way to a retry tier, a dead-letter queue or back.

Each rewrite keeps the body and the properties (priority included) and records, in the
headers named by :mod:`amqp_agents.models.topology`, where the request first went and
which attempt comes next; a dead letter also says why. ``docs/protocol.md`` documents
the headers; the ``dead-letters --replay`` command uses :func:`replay_envelope`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

from amqp_agents.models.topology import (
    BROKER_DEATH_HEADERS,
    DEAD_LETTER_HEADERS,
    HEADER_ATTEMPT,
    HEADER_DEAD_LETTERED_AT,
    HEADER_DEADLINE,
    HEADER_ERROR_CODE,
    HEADER_ERROR_MESSAGE,
    HEADER_ORIGINAL_EXCHANGE,
    HEADER_ORIGINAL_ROUTING_KEY,
)

if TYPE_CHECKING:
    from amqp_agents.models.envelope import Envelope, HeaderValue

__all__ = ["attempt_from", "dead_letter_envelope", "replay_envelope", "retry_envelope"]


def attempt_from(envelope: Envelope) -> int:
    """Which attempt a delivery is (the ``x-attempt`` header; 1 when absent or bad)."""
    raw = (envelope.headers or {}).get(HEADER_ATTEMPT)
    return raw if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 1 else 1


def _rerouted(
    envelope: Envelope,
    *,
    exchange: str,
    routing_key: str,
    attempt: int,
    headers: dict[str, HeaderValue] | None = None,
) -> Envelope:
    """The request sent on (retry tier, dead letters) as ``attempt``, with the original
    routing remembered in headers and no ``expiration`` (a per-message TTL would expire
    it where it goes; the deadline header still bounds retries)."""
    merged = dict(envelope.headers or {})
    merged.setdefault(HEADER_ORIGINAL_EXCHANGE, envelope.exchange)
    merged.setdefault(HEADER_ORIGINAL_ROUTING_KEY, envelope.routing_key)
    merged[HEADER_ATTEMPT] = attempt
    merged.update(headers or {})
    return dataclasses.replace(
        envelope,
        exchange=exchange,
        routing_key=routing_key,
        headers=merged,
        expiration_ms=None,
        redelivered=False,
    )


def retry_envelope(envelope: Envelope, *, queue: str, attempt: int) -> Envelope:
    """The request again, for the queue ``queue`` (via the default exchange), as ``attempt``.

    Keeps body and properties, priority included.
    """
    return _rerouted(envelope, exchange="", routing_key=queue, attempt=attempt)


def dead_letter_envelope(
    envelope: Envelope, *, exchange: str, routing_key: str, code: str, message: str, attempt: int
) -> Envelope:
    """The request for a dead-letter queue, with headers saying why (see the protocol)."""
    return _rerouted(
        envelope,
        exchange=exchange,
        routing_key=routing_key,
        attempt=attempt,
        headers={
            HEADER_ERROR_CODE: code,
            HEADER_ERROR_MESSAGE: message[:1000],
            HEADER_DEAD_LETTERED_AT: int(time.time() * 1000),
        },
    )


def replay_envelope(envelope: Envelope) -> Envelope:
    """A dead letter sent back to its original exchange and key, as a first attempt.

    The failure headers, the attempt count and the caller's deadline (long gone) are
    dropped; body and the other properties are kept.
    """
    original = envelope.headers or {}
    death, first_death = BROKER_DEATH_HEADERS
    dropped = {*DEAD_LETTER_HEADERS, HEADER_ATTEMPT, HEADER_DEADLINE, death}
    headers = {
        k: v for k, v in original.items() if k not in dropped and not k.startswith(first_death)
    }
    exchange = original.get(HEADER_ORIGINAL_EXCHANGE)
    routing_key = original.get(HEADER_ORIGINAL_ROUTING_KEY)
    return dataclasses.replace(
        envelope,
        exchange=exchange if isinstance(exchange, str) else envelope.exchange,
        routing_key=routing_key if isinstance(routing_key, str) else envelope.routing_key,
        headers=headers or None,
        expiration_ms=None,
        redelivered=False,
    )
