"""The one exception tree of amqp-agents.

Every lower-level exception (aio-pika, aiormq, OSError, pydantic) is mapped into this
tree at the seam where it is raised; nothing else escapes the public API::

    AmqpAgentsError
    ├── ConfigurationError (ValueError)      bad settings or arguments, caught at start
    ├── LifecycleError (RuntimeError)        start twice, use before start or after close
    ├── TransportError                       the broker or the link to it
    │   ├── BrokerUnavailableError (ConnectionError)   cannot connect / connection lost
    │   ├── PublishTimeoutError (TimeoutError)         no confirm within the deadline
    │   ├── PublishRejectedError                       the broker nacked a publish
    │   ├── UnroutableError                            mandatory publish matched no queue
    │   ├── TopologyMismatchError                      queue/exchange exists with other args
    │   ├── ResourceLockedError                        exclusive queue of another connection
    │   ├── AccessRefusedError (PermissionError)       not permitted, or a reserved name
    │   └── QueueNotFoundError (LookupError)           passive declare of a missing queue
    └── AgentError                            an error that becomes an error *reply*
        ├── UnknownActionError                UNKNOWN_ACTION
        ├── InvalidPayloadError (ValueError)  INVALID_PAYLOAD (details = field errors)
        ├── NotFoundError (LookupError)       NOT_FOUND
        ├── ActionTimeoutError (TimeoutError) TIMEOUT
        ├── InternalError                     INTERNAL_ERROR
        ├── ShuttingDownError                 SHUTTING_DOWN
        ├── NoRouteError                      NO_ROUTE
        ├── ConnectionLostError (ConnectionError)  CONNECTION_LOST
        ├── MessageTooLargeError (ValueError)  MESSAGE_TOO_LARGE
        ├── RejectedError                     REJECTED
        └── RetryableError                    UNAVAILABLE (retried by the worker)
            └── Retry                         UNAVAILABLE (retry after delay_s)

A handler raises an :class:`AgentError` to answer with that code; any other exception
becomes ``INTERNAL_ERROR`` with the traceback logged, never sent. Only
:class:`RetryableError` (and, by default, unexpected exceptions) are retried; other
agent errors are answers, not failures. On the calling side
:meth:`AgentError.from_info` turns a failed reply back into the matching class.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar, Protocol

__all__ = [
    "AccessRefusedError",
    "ActionTimeoutError",
    "AgentError",
    "AmqpAgentsError",
    "BrokerUnavailableError",
    "ConfigurationError",
    "ConnectionLostError",
    "ErrorCode",
    "InternalError",
    "InvalidPayloadError",
    "LifecycleError",
    "MessageTooLargeError",
    "NoRouteError",
    "NotFoundError",
    "PublishRejectedError",
    "PublishTimeoutError",
    "QueueNotFoundError",
    "RejectedError",
    "ResourceLockedError",
    "Retry",
    "RetryableError",
    "ShuttingDownError",
    "TopologyMismatchError",
    "TransportError",
    "UnknownActionError",
    "UnroutableError",
]


class ErrorCode(StrEnum):
    """Stable error codes carried in ``error.code`` of a reply. Never renamed.

    Services may send codes of their own; receivers must treat an unknown code as an
    application error, which is why :class:`ErrorInfo` keeps ``code`` a plain string.
    """

    UNKNOWN_ACTION = "UNKNOWN_ACTION"
    """The agent has no handler for the request's ``type`` (action)."""
    INVALID_PAYLOAD = "INVALID_PAYLOAD"
    """The body is not JSON, not an object, or fails the action's schema."""
    NOT_FOUND = "NOT_FOUND"
    """The handler looked for something that does not exist."""
    TIMEOUT = "TIMEOUT"
    """The handler ran out of time, or the caller's wait for a reply did."""
    INTERNAL_ERROR = "INTERNAL_ERROR"
    """The handler failed unexpectedly; details are in the worker's log, not on the wire."""
    SHUTTING_DOWN = "SHUTTING_DOWN"
    """The caller or agent is shutting down and the call cannot complete."""
    NO_ROUTE = "NO_ROUTE"
    """No queue is bound for the agent: nobody serves it (returned by the broker)."""
    CONNECTION_LOST = "CONNECTION_LOST"
    """The connection to the broker died while the call was pending."""
    MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"
    """The encoded request or reply is larger than the configured maximum."""
    UNAVAILABLE = "UNAVAILABLE"
    """Something the handler needs is unavailable; it was retried and still failed."""
    REJECTED = "REJECTED"
    """The broker refused to enqueue the request (``basic.nack``: e.g. a full queue with
    ``overflow=reject-publish``, or a broker-side failure)."""


class ErrorFields(Protocol):
    """What :meth:`AgentError.from_info` reads of a reply's ``error`` object."""

    @property
    def code(self) -> str: ...
    @property
    def message(self) -> str: ...
    @property
    def details(self) -> Any: ...


class AmqpAgentsError(Exception):
    """Base of every exception this library raises."""


class ConfigurationError(AmqpAgentsError, ValueError):
    """Invalid settings or arguments."""


class LifecycleError(AmqpAgentsError, RuntimeError):
    """An object was used in the wrong lifecycle state (not started, closed, started twice)."""


class TransportError(AmqpAgentsError):
    """The broker, or the connection to it, failed an operation."""


class BrokerUnavailableError(TransportError, ConnectionError):
    """The broker cannot be reached, or the connection to it was lost."""


class PublishTimeoutError(TransportError, TimeoutError):
    """The broker did not confirm a publish in time; it may or may not have been enqueued."""


class PublishRejectedError(TransportError):
    """The broker refused a publish (``basic.nack``)."""


class UnroutableError(TransportError):
    """A mandatory publish matched no queue and the broker returned it."""

    def __init__(self, exchange: str, routing_key: str) -> None:
        super().__init__(f"no queue is bound to exchange {exchange!r} for key {routing_key!r}")
        self.exchange = exchange
        self.routing_key = routing_key


class TopologyMismatchError(TransportError):
    """A queue or exchange already exists with different arguments (PRECONDITION_FAILED)."""


class AccessRefusedError(TransportError, PermissionError):
    """The broker refused the operation (ACCESS_REFUSED: permissions, reserved names)."""


class ResourceLockedError(TransportError):
    """The queue is exclusive to another connection (RESOURCE_LOCKED)."""


class QueueNotFoundError(TransportError, LookupError):
    """The queue does not exist on the broker."""


class AgentError(AmqpAgentsError):
    """An error with a stable wire code; raise it in a handler to reply with it."""

    code: ClassVar[str] = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str = "", *, details: Any = None) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.details = details

    @classmethod
    def from_info(cls, info: ErrorFields) -> AgentError:
        """The exception for a reply's error; unknown codes give a plain :class:`AgentError`."""
        kind = _BY_CODE.get(info.code)
        if kind is None:
            error = AgentError(info.message, details=info.details)
            error.code = info.code  # type: ignore[misc]  # an instance-level custom code
            return error
        return kind(info.message, details=info.details)


class UnknownActionError(AgentError):
    """The agent has no handler for this action."""

    code = ErrorCode.UNKNOWN_ACTION


class InvalidPayloadError(AgentError, ValueError):
    """The request body is not valid JSON, not an object, or fails the action's schema."""

    code = ErrorCode.INVALID_PAYLOAD


class NotFoundError(AgentError, LookupError):
    """The thing the request refers to does not exist."""

    code = ErrorCode.NOT_FOUND


class ActionTimeoutError(AgentError, TimeoutError):
    """The handler, or the caller's wait for the reply, ran out of time."""

    code = ErrorCode.TIMEOUT


class InternalError(AgentError):
    """The handler failed unexpectedly."""

    code = ErrorCode.INTERNAL_ERROR


class ShuttingDownError(AgentError):
    """The caller or the agent is shutting down."""

    code = ErrorCode.SHUTTING_DOWN


class NoRouteError(AgentError):
    """No queue serves the agent the request was sent to."""

    code = ErrorCode.NO_ROUTE


class ConnectionLostError(AgentError, ConnectionError):
    """The broker connection died while the call was pending."""

    code = ErrorCode.CONNECTION_LOST


class MessageTooLargeError(AgentError, ValueError):
    """The encoded message exceeds the configured maximum size."""

    code = ErrorCode.MESSAGE_TOO_LARGE


class RejectedError(AgentError):
    """The broker refused to enqueue the request."""

    code = ErrorCode.REJECTED


class RetryableError(AgentError):
    """A transient failure (a dependency is down): the worker retries the request."""

    code = ErrorCode.UNAVAILABLE


class Retry(RetryableError):
    """Ask the worker to run the request again later, after about ``delay_s``."""

    def __init__(
        self, message: str = "", *, delay_s: float | None = None, details: Any = None
    ) -> None:
        super().__init__(message or "the handler asked for a retry", details=details)
        if delay_s is not None and delay_s < 0:
            raise ConfigurationError("Retry(delay_s=...) must not be negative")
        self.delay_s = delay_s


_BY_CODE: dict[str, type[AgentError]] = {
    kind.code: kind
    for kind in (
        UnknownActionError,
        InvalidPayloadError,
        NotFoundError,
        ActionTimeoutError,
        InternalError,
        ShuttingDownError,
        NoRouteError,
        ConnectionLostError,
        MessageTooLargeError,
        RejectedError,
        RetryableError,
    )
}
