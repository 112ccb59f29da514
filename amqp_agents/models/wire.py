"""The JSON codec of the wire contract: requests, replies and events to and from AMQP.

Encoding and decoding happen once per message: payloads are turned into JSON bytes by
pydantic-core directly, never via ``json``. The names it writes (exchanges, headers)
come from :mod:`amqp_agents.models.topology`; the rewrites of a request for a retry
tier or a dead-letter queue live in :mod:`amqp_agents.models.rewrites`. The layout is
explained to services in other languages in ``docs/protocol.md``.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import pydantic_core
from pydantic import ValidationError

from amqp_agents.errors import ErrorCode, InvalidPayloadError, MessageTooLargeError
from amqp_agents.models.envelope import Envelope
from amqp_agents.models.messages import MAX_ACTION_LENGTH, AgentMessage, AgentResponse, Event
from amqp_agents.models.topology import (
    CONTENT_TYPE_JSON,
    HEADER_CAUSATION_ID,
    HEADER_DEADLINE,
    MAX_PRIORITY,
)

if TYPE_CHECKING:
    from amqp_agents.models.topology import Topology

__all__ = [
    "RequestParts",
    "deadline_from",
    "decode_event",
    "decode_reply",
    "decode_request",
    "dump_json",
    "encode_event",
    "encode_reply",
    "encode_request",
    "encode_success",
    "read_request",
]

_validate_reply: Final = AgentResponse.__pydantic_validator__.validate_python
"""``AgentResponse.model_validate`` without its Python wrapper (a reply per call)."""
_MAX_EPOCH_MS: Final = 253_402_300_799_000  # 9999-12-31, datetime's limit


def dump_json(value: Any) -> bytes:
    """Encode a payload (pydantic model or JSON-able value) to compact JSON bytes."""
    try:
        return pydantic_core.to_json(value)
    except pydantic_core.PydanticSerializationError as exc:
        raise InvalidPayloadError(f"payload is not JSON-serialisable: {exc}") from exc


def deadline_from(envelope: Envelope) -> float | None:
    """The caller's deadline as epoch seconds, from the header; ``None`` if absent or bad."""
    headers = envelope.headers
    if not headers:
        return None
    raw = headers.get(HEADER_DEADLINE)
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 < raw < _MAX_EPOCH_MS:
        return raw / 1000.0
    return None


def _datetime(epoch_s: float | None) -> datetime:
    """An AMQP timestamp as a datetime; absent or out of range means now."""
    if epoch_s is not None and 0 < epoch_s < _MAX_EPOCH_MS / 1000:
        return datetime.fromtimestamp(epoch_s, UTC)
    return datetime.now(UTC)


def encode_request(
    topology: Topology,
    agent: str,
    action: str,
    body: bytes,
    *,
    message_id: str,
    correlation_id: str | None,
    reply_to: str | None,
    priority: int,
    timeout_s: float | None,
    max_bytes: int,
    deadline_ms: int | None = None,
    causation_id: str | None = None,
    persistent: bool = True,
) -> Envelope:
    """The AMQP message for a request; ``timeout_s`` sets both deadline header and TTL.

    ``deadline_ms`` (a parent request's ``x-deadline``, when that is what bounds this
    one) is written as it is, so the deadline travels unchanged across hops;
    ``causation_id`` becomes the ``x-causation-id`` header. ``persistent=False`` (delivery
    mode 1) spares the broker a disk write per request, and the request is lost if the
    broker restarts before a worker takes it (``docs/protocol.md`` section 3.1).
    """
    if len(body) > max_bytes:
        raise MessageTooLargeError(
            f"request body is {len(body)} bytes, over the {max_bytes}-byte limit"
        )
    now = time.time()
    headers: dict[str, Any] | None = None
    expiration_ms: int | None = None
    if timeout_s is not None:
        expiration_ms = max(1, int(timeout_s * 1000))
        if deadline_ms is None:
            deadline_ms = int((now + timeout_s) * 1000)
        headers = {HEADER_DEADLINE: deadline_ms}
    if causation_id is not None:
        headers = {**(headers or {}), HEADER_CAUSATION_ID: causation_id}
    return Envelope(
        body=body,
        exchange=topology.requests_exchange,
        routing_key=agent,
        content_type=CONTENT_TYPE_JSON,
        type=action,
        message_id=message_id,
        correlation_id=correlation_id,
        reply_to=reply_to,
        priority=priority,
        expiration_ms=expiration_ms,
        timestamp=int(now),
        headers=headers,
        persistent=persistent,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class RequestParts:
    """What a worker needs of a request to run it (no model built on the hot path).

    :func:`decode_request` turns it into the public :class:`AgentMessage`.
    """

    action: str
    payload: dict[str, Any]
    correlation_id: str | None


def read_request(envelope: Envelope) -> RequestParts:
    """The action, JSON object and correlation id of a request in a delivery.

    Raises:
        InvalidPayloadError: no ``type`` (action) or one over 255 characters, a
            content type other than JSON, malformed JSON, or a body that is not a
            JSON object.
    """
    action = envelope.type
    if not action:
        raise InvalidPayloadError("the request has no 'type' property naming the action")
    if len(action) > MAX_ACTION_LENGTH:
        raise InvalidPayloadError(
            "the request's properties are invalid: the action ('type') is over"
            f" {MAX_ACTION_LENGTH} characters"
        )
    return RequestParts(action, _json_object(envelope), envelope.correlation_id)


def decode_request(envelope: Envelope) -> AgentMessage:
    """The request in a delivery, as the public model.

    Raises:
        InvalidPayloadError: as :func:`read_request`.
    """
    parts = read_request(envelope)
    priority = envelope.priority or 0
    deadline = deadline_from(envelope)
    try:
        return AgentMessage(
            id=envelope.message_id or "",
            action=parts.action,
            payload=parts.payload,
            correlation_id=parts.correlation_id,
            reply_to=envelope.reply_to,
            priority=min(max(priority, 0), MAX_PRIORITY),
            created_at=_datetime(envelope.timestamp),
            deadline=None if deadline is None else _datetime(deadline),
            redelivered=envelope.redelivered,
        )
    except ValidationError as exc:  # not reached: read_request checks what can fail
        raise InvalidPayloadError(
            f"the request's properties are invalid: {exc.errors()[0]['msg']}"
        ) from None


def encode_reply(response: AgentResponse, reply_to: str, correlation_id: str | None) -> Envelope:
    """The AMQP message for a reply: default exchange, routing key = ``reply_to``."""
    if response.ok:
        return encode_success(response.data, reply_to, correlation_id)
    assert response.error is not None  # noqa: S101  # guaranteed by AgentResponse
    body = dump_json({"ok": False, "error": response.error.model_dump(exclude_none=True)})
    return _reply_envelope(body, reply_to, correlation_id)


def encode_success(data: Any, reply_to: str, correlation_id: str | None) -> Envelope:
    """The AMQP message for a successful reply carrying ``data``.

    Raises:
        InvalidPayloadError: ``data`` is not JSON-serialisable.
    """
    return _reply_envelope(dump_json({"ok": True, "data": data}), reply_to, correlation_id)


def _reply_envelope(body: bytes, reply_to: str, correlation_id: str | None) -> Envelope:
    return Envelope(
        body=body,
        exchange="",
        routing_key=reply_to,
        content_type=CONTENT_TYPE_JSON,
        correlation_id=correlation_id,
        persistent=False,
    )


def encode_event(
    topology: Topology,
    event_type: str,
    body: bytes,
    *,
    message_id: str,
    correlation_id: str | None = None,
    reply_to: str | None = None,
    max_bytes: int,
    causation_id: str | None = None,
) -> Envelope:
    """The AMQP message for an event: topic exchange, routing key = type, persistent;
    ``causation_id`` becomes the ``x-causation-id`` header."""
    if len(body) > max_bytes:
        raise MessageTooLargeError(
            f"event body is {len(body)} bytes, over the {max_bytes}-byte limit"
        )
    return Envelope(
        body=body,
        exchange=topology.events_exchange,
        routing_key=event_type,
        content_type=CONTENT_TYPE_JSON,
        type=event_type,
        message_id=message_id,
        correlation_id=correlation_id,
        reply_to=reply_to,
        timestamp=int(time.time()),
        headers=None if causation_id is None else {HEADER_CAUSATION_ID: causation_id},
        persistent=True,
    )


def decode_event(envelope: Envelope) -> Event:
    """The event in a delivery; its type is the ``type`` property, else the routing key.

    Raises:
        InvalidPayloadError: not JSON, not a JSON object, or a non-JSON content type.
    """
    payload = _json_object(envelope)
    return Event(
        id=envelope.message_id or "",
        type=envelope.type or envelope.routing_key,
        payload=payload,
        timestamp=_datetime(envelope.timestamp),
        correlation_id=envelope.correlation_id,
        reply_to=envelope.reply_to,
        redelivered=envelope.redelivered,
    )


def _json_object(envelope: Envelope) -> dict[str, Any]:
    content_type = envelope.content_type
    if (
        content_type
        and content_type != CONTENT_TYPE_JSON
        and content_type.split(";", 1)[0].strip().lower() != CONTENT_TYPE_JSON
    ):
        raise InvalidPayloadError(
            f"content type {content_type!r} is not supported; send {CONTENT_TYPE_JSON}"
        )
    try:
        payload = pydantic_core.from_json(envelope.body) if envelope.body else {}
    except ValueError as exc:
        raise InvalidPayloadError(f"body is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise InvalidPayloadError(f"body must be a JSON object, got {type(payload).__name__}")
    return payload


def decode_reply(envelope: Envelope) -> AgentResponse:
    """The reply in a delivery; a malformed one becomes an ``INTERNAL_ERROR`` reply."""
    try:
        body = pydantic_core.from_json(envelope.body)
        if not isinstance(body, dict):
            raise ValueError("a reply must be a JSON object")
        body["correlation_id"] = envelope.correlation_id
        reply: AgentResponse = _validate_reply(body)
        return reply
    except (ValueError, ValidationError) as exc:
        problem = f"{exc.error_count()} problem(s)" if isinstance(exc, ValidationError) else exc
        return AgentResponse.failure(
            ErrorCode.INTERNAL_ERROR,
            f"malformed reply from the agent: {problem}",
            correlation_id=envelope.correlation_id,
        )
