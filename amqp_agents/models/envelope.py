"""The transport-neutral shape of one AMQP message: body plus the properties we use.

Both transports produce and consume :class:`Envelope`; no aio-pika type crosses the
transport seam. It is a slotted dataclass, not a pydantic model: one is built per
message on the hot path and every field is already validated by whoever fills it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Envelope", "HeaderValue"]

HeaderValue = str | int | bool | bytes | None
"""The header value types that survive a round trip through AMQP field tables.

Not float: RabbitMQ clients encode Python floats as 32-bit, so they do not round-trip.
Headers the broker adds (``x-death``) may hold lists and tables as well.
"""


@dataclass(slots=True)
class Envelope:
    """One message as published or delivered.

    ``expiration_ms`` is the AMQP per-message TTL; ``timestamp`` is whole seconds since the
    epoch (AMQP's resolution); ``redelivered`` is only meaningful on deliveries. A
    message published without ``message_id`` gets a random one (the broker needs one
    to report a mandatory message it could not route).
    """

    body: bytes
    exchange: str = ""
    routing_key: str = ""
    content_type: str | None = None
    type: str | None = None
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    priority: int | None = None
    expiration_ms: int | None = None
    timestamp: int | None = None
    headers: dict[str, HeaderValue] | None = None
    persistent: bool = True
    redelivered: bool = False
