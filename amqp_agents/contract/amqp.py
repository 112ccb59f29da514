"""The AMQP parts of the AsyncAPI document: bindings, headers, messages, the error reply.

Everything here restates ``docs/protocol.md`` in AsyncAPI's terms, from the one place
that spells each name (:mod:`amqp_agents.models.topology`) and the one list of error
codes (:class:`~amqp_agents.errors.ErrorCode`), so the document follows them when they
change. Bindings use version 0.3.0 of the AMQP binding; what it has no field for (a
queue's arguments, the patterns a queue is bound with) is carried in ``x-`` extensions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from amqp_agents.errors import ErrorCode
from amqp_agents.models.topology import (
    CONTENT_TYPE_JSON,
    HEADER_ATTEMPT,
    HEADER_DEADLINE,
    HEADER_TRACEPARENT,
    HEADER_TRACESTATE,
    MAX_PRIORITY,
)

if TYPE_CHECKING:
    from amqp_agents.models.topology import QueueSpec, Topology

__all__ = [
    "BINDING_VERSION",
    "CORRELATION_ID",
    "ERROR_REPLY",
    "REPLY_ADDRESS",
    "SCHEMAS",
    "common_components",
    "event_message",
    "exchange_binding",
    "queue_binding",
    "reply_message",
    "request_message",
]

BINDING_VERSION: Final = "0.3.0"  # of the AMQP binding, in every ``bindings.amqp``

# AsyncAPI runtime expressions: a reply goes to the request's ``reply_to`` property, and
# the ``correlation_id`` property of both ties it to its request.
REPLY_ADDRESS: Final = "$message.header#/reply_to"
CORRELATION_ID: Final = "$message.header#/correlation_id"


def exchange_binding(exchange: str, kind: str, vhost: str) -> dict[str, Any]:
    """A channel that is a routing key on a durable ``exchange`` of ``kind``."""
    return {
        "is": "routingKey",
        "exchange": {
            "name": exchange,
            "type": kind,
            "durable": True,
            "autoDelete": False,
            "vhost": vhost,
        },
        "bindingVersion": BINDING_VERSION,
    }


def queue_binding(spec: QueueSpec, vhost: str) -> dict[str, Any]:
    """A channel that is a queue, declared as ``spec`` says (arguments in
    ``x-arguments``; a server-named queue has no name)."""
    queue: dict[str, Any] = {
        "durable": spec.durable,
        "exclusive": spec.exclusive,
        "autoDelete": spec.auto_delete,
        "vhost": vhost,
    }
    if spec.name:
        queue = {"name": spec.name, **queue}
    binding: dict[str, Any] = {"is": "queue", "queue": queue, "bindingVersion": BINDING_VERSION}
    if spec.arguments:
        binding["x-arguments"] = dict(spec.arguments)
    return binding


# Names in ``components``: the ``amqp-agents.`` prefix (``-`` cannot be in a Python
# name) keeps them apart from the models that pydantic names there.
SCHEMAS: Final = "#/components/schemas/"
ERROR_REPLY: Final = "amqp-agents.ErrorReply"
_ERROR_CODE: Final = "amqp-agents.ErrorCode"
_REQUEST_HEADERS: Final = "amqp-agents.RequestHeaders"


def common_components(topology: Topology) -> dict[str, Any]:
    """``components`` shared by every agent: the request headers, the error codes and
    the error reply (schema and message)."""
    return {
        "schemas": {
            _REQUEST_HEADERS: _request_headers(topology),
            _ERROR_CODE: {
                "type": "string",
                "enum": [code.value for code in ErrorCode],
                "description": "The library's error codes (docs/protocol.md section 5)."
                " Handlers may send codes of their own: receivers must accept any string.",
            },
            ERROR_REPLY: _error_reply(),
        },
        "messages": {
            ERROR_REPLY: {
                "name": "error",
                "title": "Error reply",
                "summary": "The action failed: a stable code, a message for humans.",
                "headers": _reply_headers(),
                "payload": {"$ref": SCHEMAS + ERROR_REPLY},
                "correlationId": {"location": CORRELATION_ID},
            }
        },
    }


_PROPERTY: Final = "AMQP property (not a header-table entry)"


def _request_headers(topology: Topology) -> dict[str, Any]:
    """What a request carries besides its body (protocol section 3.1)."""
    return {
        "type": "object",
        "properties": {
            "type": {"type": "string", "description": f"{_PROPERTY}: the action. Required."},
            "correlation_id": {
                "type": "string",
                "description": f"{_PROPERTY}: copied into the reply; unguessable, one per call.",
            },
            "reply_to": {
                "type": "string",
                "description": f"{_PROPERTY}: the queue the reply goes to; absent: no reply.",
            },
            "message_id": {"type": "string", "description": f"{_PROPERTY}: for deduplication."},
            "priority": {
                "type": "integer",
                "minimum": 0,
                "maximum": MAX_PRIORITY,
                "description": f"{_PROPERTY}: 0-9, absent = 0 (higher is served first"
                f" on classic queues, up to {topology.max_priority}).",
            },
            "expiration": {
                "type": "string",
                "pattern": "^[0-9]+$",
                "description": f"{_PROPERTY}: the caller's timeout in ms, a decimal string.",
            },
            "content_type": {"const": CONTENT_TYPE_JSON, "description": _PROPERTY},
            HEADER_DEADLINE: {
                "type": "integer",
                "minimum": 1,
                "description": "When the caller stops waiting, ms since the Unix epoch:"
                " a request picked up later is dropped unanswered.",
            },
            HEADER_ATTEMPT: {
                "type": "integer",
                "minimum": 1,
                "description": "Which delivery attempt (1 when absent); set by workers.",
            },
            HEADER_TRACEPARENT: {"type": "string", "description": "W3C trace context."},
            HEADER_TRACESTATE: {"type": "string", "description": "W3C trace state."},
        },
        "required": ["type"],
    }


def _reply_headers() -> dict[str, Any]:
    """What a reply carries besides its body (protocol section 4.1)."""
    return {
        "type": "object",
        "properties": {
            "correlation_id": {
                "type": "string",
                "description": f"{_PROPERTY}: the request's, unchanged.",
            },
            "content_type": {"const": CONTENT_TYPE_JSON, "description": _PROPERTY},
        },
    }


def _event_headers(event_type: str | None) -> dict[str, Any]:
    """What an event carries besides its body (protocol section 11); ``event_type``:
    the one type these events have, ``None`` when a pattern matches several."""
    kind: dict[str, Any] = {"type": "string"} if event_type is None else {"const": event_type}
    kind["description"] = f"{_PROPERTY}: the event type (else the routing key)."
    return {
        "type": "object",
        "properties": {
            "type": kind,
            "message_id": {
                "type": "string",
                "description": f"{_PROPERTY}: the event's id; subscribers dedupe by it.",
            },
            "timestamp": {"type": "integer", "description": f"{_PROPERTY}: when, in seconds."},
        },
    }


def _error_reply() -> dict[str, Any]:
    """``{"ok": false, "error": {"code", "message", "details"?}}`` (protocol section 4.2)."""
    return {
        "type": "object",
        "properties": {
            "ok": {"const": False},
            "error": {
                "type": "object",
                "properties": {
                    "code": {"anyOf": [{"$ref": SCHEMAS + _ERROR_CODE}, {"type": "string"}]},
                    "message": {"type": "string", "description": "For humans: do not parse."},
                    "details": {
                        "description": "Optional, any JSON (field errors for INVALID_PAYLOAD)."
                    },
                },
                "required": ["code", "message"],
            },
        },
        "required": ["ok", "error"],
    }


def request_message(action: str, summary: str | None, payload: Any) -> dict[str, Any]:
    """A request of ``action``: told apart from the agent's other requests by ``type``."""
    message: dict[str, Any] = {
        "name": action,
        "title": f"Request {action}",
        "headers": {
            "allOf": [
                {"$ref": SCHEMAS + _REQUEST_HEADERS},
                {"type": "object", "properties": {"type": {"const": action}}, "required": ["type"]},
            ]
        },
        "payload": payload,
        "correlationId": {"location": CORRELATION_ID},
        "bindings": {"amqp": {"messageType": action, "bindingVersion": BINDING_VERSION}},
    }
    if summary:
        message["summary"] = summary
    return message


def reply_message(action: str, data: Any) -> dict[str, Any]:
    """A successful reply to ``action``, carrying ``data``."""
    return {
        "name": f"{action} reply",
        "title": f"Reply to {action}",
        "headers": _reply_headers(),
        "payload": {
            "type": "object",
            "properties": {"ok": {"const": True}, "data": data},
            "required": ["ok", "data"],
        },
        "correlationId": {"location": CORRELATION_ID},
    }


def event_message(name: str, payload: Any, *, one_type: bool) -> dict[str, Any]:
    """An event message: of type ``name``, or (``one_type=False``) matching pattern ``name``."""
    message: dict[str, Any] = {
        "name": name,
        "title": f"Event {name}" if one_type else f"Events matching {name}",
        "headers": _event_headers(name if one_type else None),
        "payload": payload,
    }
    if one_type:
        message["bindings"] = {"amqp": {"messageType": name, "bindingVersion": BINDING_VERSION}}
    return message
