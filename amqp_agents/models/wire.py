"""The wire contract in one place: names, header keys and the JSON codec.

Everything a service in another language must know to call an agent is spelled here
(and explained in ``docs/protocol.md``). Encoding and decoding happen once per message:
payloads are turned into JSON bytes by pydantic-core directly, never via ``json``.

It is over 450 lines because it owns four things (topology names, header names, the
JSON codec and the retry / dead-letter / replay rewrites); issue 19 splits them.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from datetime import UTC, datetime
from typing import Any, Final

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from amqp_agents.errors import ConfigurationError, InvalidPayloadError, MessageTooLargeError
from amqp_agents.models.envelope import Envelope, HeaderValue
from amqp_agents.models.messages import (
    MAX_ACTION_LENGTH,
    AgentMessage,
    AgentResponse,
    ErrorCode,
    Event,
)

__all__ = [
    "CONTENT_TYPE_JSON",
    "HEADER_DEADLINE",
    "MAX_PRIORITY",
    "RequestParts",
    "Topology",
    "check_name",
    "deadline_from",
    "decode_reply",
    "decode_request",
    "dump_json",
    "encode_reply",
    "encode_request",
    "encode_success",
    "read_request",
]

CONTENT_TYPE_JSON: Final = "application/json"
HEADER_DEADLINE: Final = "x-deadline"
"""Header: the caller's deadline, integer milliseconds since the Unix epoch."""
HEADER_ATTEMPT: Final = "x-attempt"
"""Header: which delivery attempt this is (1 when absent); set by retries, not x-death."""
HEADER_ERROR_CODE: Final = "x-error-code"
"""Dead letters: the error code of the last failure."""
HEADER_ERROR_MESSAGE: Final = "x-error-message"
"""Dead letters: the error message of the last failure."""
HEADER_ORIGINAL_EXCHANGE: Final = "x-original-exchange"
"""Dead letters: the exchange the request was first published to."""
HEADER_ORIGINAL_ROUTING_KEY: Final = "x-original-routing-key"
"""Dead letters: its routing key (the agent)."""
HEADER_DEAD_LETTERED_AT: Final = "x-dead-lettered-at"
"""Dead letters: when, integer milliseconds since the Unix epoch."""
_DEAD_LETTER_HEADERS: Final = (
    HEADER_ERROR_CODE,
    HEADER_ERROR_MESSAGE,
    HEADER_ORIGINAL_EXCHANGE,
    HEADER_ORIGINAL_ROUTING_KEY,
    HEADER_DEAD_LETTERED_AT,
)
MAX_PRIORITY: Final = 9
"""Highest priority in the contract; the default ``x-max-priority`` of agent queues."""

_validate_reply: Final = AgentResponse.__pydantic_validator__.validate_python
"""``AgentResponse.model_validate`` without its Python wrapper (a reply per call)."""
_MAX_EPOCH_MS: Final = 253_402_300_799_000  # 9999-12-31, datetime's limit
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$")


@functools.lru_cache(maxsize=4096)
def check_name(kind: str, name: str) -> str:
    """Validate an agent/action/group/event name: it becomes a routing key or queue name.

    Raises:
        ConfigurationError: (a ``ValueError``) naming the rule.
    """
    if not _NAME.fullmatch(name):
        raise ConfigurationError(
            f"invalid {kind} name {name!r}: use 1-200 characters from letters, digits,"
            " '_', '.', '-', starting with a letter or digit"
        )
    return name


class Topology(BaseModel):
    """The names of exchanges and queues, configurable as a whole.

    Changing a name changes the wire contract: every service must agree on it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    requests_exchange: str = Field(default="agents", min_length=1)
    queue_prefix: str = "agents."
    max_priority: int = Field(default=MAX_PRIORITY, ge=1, le=255)
    events_exchange: str = Field(default="events", min_length=1)
    event_queue_prefix: str = "events."
    dead_letter_suffix: str = ".dead"
    dead_letter_exchange_suffix: str = ".dlx"

    @field_validator("requests_exchange", "events_exchange")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value.startswith("amq."):
            raise ValueError("exchange names starting with 'amq.' are reserved by RabbitMQ")
        return value

    def agent_queue(self, agent: str) -> str:
        """The durable priority queue an agent consumes: ``agents.<agent>``."""
        return f"{self.queue_prefix}{agent}"

    @property
    def requests_dead_letter_exchange(self) -> str:
        """Where rejected requests go (direct, key = agent): ``agents.dlx``."""
        return f"{self.requests_exchange}{self.dead_letter_exchange_suffix}"

    def agent_dead_letter_queue(self, agent: str) -> str:
        """Requests an agent could not process: ``agents.<agent>.dead``."""
        return f"{self.agent_queue(agent)}{self.dead_letter_suffix}"

    def agent_retry_queue(self, agent: str, delay_ms: int) -> str:
        """A delay tier: ``agents.<agent>.retry.<delay_ms>``; its TTL leads back to work."""
        return f"{self.agent_queue(agent)}.retry.{delay_ms}"

    def may_reply_to(self, reply_to: str) -> bool:
        """Whether a worker may send a reply to ``reply_to``: a short string (AMQP
        limit), and not one of the library's own agent or event queues, so that a
        request cannot make a worker post into another agent's queue.
        """
        return len(reply_to.encode()) <= 255 and not reply_to.startswith(
            (self.queue_prefix, self.event_queue_prefix)
        )

    def group_queue(self, group: str) -> str:
        """The durable queue a subscriber group shares: ``events.<group>``."""
        return f"{self.event_queue_prefix}{group}"

    @property
    def events_dead_letter_exchange(self) -> str:
        """Where rejected events go (direct, key = group): ``events.dlx``."""
        return f"{self.events_exchange}{self.dead_letter_exchange_suffix}"

    def group_dead_letter_queue(self, group: str) -> str:
        """Events a group could not process: ``events.<group>.dead``."""
        return f"{self.group_queue(group)}{self.dead_letter_suffix}"


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
    dropped = {*_DEAD_LETTER_HEADERS, HEADER_ATTEMPT, HEADER_DEADLINE, "x-death"}
    headers = {
        k: v for k, v in original.items() if k not in dropped and not k.startswith("x-first-death")
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
) -> Envelope:
    """The AMQP message for a request; ``timeout_s`` sets both deadline header and TTL."""
    if len(body) > max_bytes:
        raise MessageTooLargeError(
            f"request body is {len(body)} bytes, over the {max_bytes}-byte limit"
        )
    now = time.time()
    headers: dict[str, Any] | None = None
    expiration_ms: int | None = None
    if timeout_s is not None:
        expiration_ms = max(1, int(timeout_s * 1000))
        headers = {HEADER_DEADLINE: int((now + timeout_s) * 1000)}
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
        persistent=True,
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
) -> Envelope:
    """The AMQP message for an event: topic exchange, routing key = type, persistent."""
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
