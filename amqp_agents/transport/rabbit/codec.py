"""Envelopes to and from aiormq's frames: the only place AMQP properties are spelled.

The hot path builds one ``Basic.Properties`` per publish and one :class:`Envelope` per
delivery, nothing else (no aio-pika ``Message`` wrappers).
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiormq import spec

from amqp_agents.models.envelope import Envelope

if TYPE_CHECKING:
    import aiormq.abc

    from amqp_agents.models.envelope import HeaderValue

__all__ = ["to_envelope", "to_properties"]


def _field_table(headers: dict[str, HeaderValue] | None) -> dict[str, Any] | None:
    # pamqp encodes bytearray, not bytes, as a byte array.
    if not headers or not any(isinstance(v, bytes) for v in headers.values()):
        return headers
    return {k: bytearray(v) if isinstance(v, bytes) else v for k, v in headers.items()}


def to_properties(env: Envelope) -> spec.Basic.Properties:
    """The AMQP properties of an envelope (persistent means delivery mode 2)."""
    return spec.Basic.Properties(
        content_type=env.content_type,
        headers=_field_table(env.headers),
        delivery_mode=2 if env.persistent else 1,
        priority=env.priority,
        correlation_id=env.correlation_id,
        reply_to=env.reply_to,
        expiration=None if env.expiration_ms is None else str(env.expiration_ms),
        message_id=env.message_id,
        timestamp=(None if env.timestamp is None else datetime.fromtimestamp(env.timestamp, UTC)),
        message_type=env.type,
    )


def to_envelope(message: aiormq.abc.DeliveredMessage) -> Envelope:
    """The envelope of a delivered message; an unparsable ``expiration`` is dropped."""
    props = message.header.properties
    delivery = message.delivery
    expiration: int | None = None
    if props.expiration:
        with contextlib.suppress(ValueError):
            expiration = int(props.expiration)
    timestamp = props.timestamp
    return Envelope(
        body=message.body,
        exchange=getattr(delivery, "exchange", "") or "",
        routing_key=getattr(delivery, "routing_key", "") or "",
        content_type=props.content_type,
        type=props.message_type,
        message_id=props.message_id,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        priority=props.priority,
        expiration_ms=expiration,
        timestamp=None if timestamp is None else int(timestamp.timestamp()),
        headers=dict(props.headers) if props.headers else None,  # type: ignore[arg-type]
        persistent=props.delivery_mode == 2,
        redelivered=bool(getattr(delivery, "redelivered", False)),
    )
