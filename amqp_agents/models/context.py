"""The message context: what a handler may know about the message it is handling.

A handler stays a plain method of its payload; it asks for the rest when it needs it::

    @action("task_add")
    async def add(self, payload: TaskAdd) -> Task:
        ctx = current_context()          # or self.context
        if await self.seen(ctx.message_id): ...

The worker sets the context around each request (and the event bus around each event
handler) in a :class:`contextvars.ContextVar`: asyncio copies it into every task the
handler starts, so nested calls and fan-outs see it too, and it is gone when the handler
returns. That one variable is the only per-task state of the library; it is set only by
:func:`use_context` (the runtime, the event bus, and tests).

What it carries forward: an :class:`~amqp_agents.rpc.client.RpcClient` call made inside a
handler is bounded by the handler's deadline (:meth:`MessageContext.time_left_s`),
inherits its priority unless given one, and names the handler's message in the
``x-causation-id`` header; an event published inside a handler carries that header too.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

from amqp_agents.errors import LifecycleError
from amqp_agents.models.rewrites import attempt_from
from amqp_agents.models.topology import HEADER_CAUSATION_ID
from amqp_agents.models.wire import deadline_from

if TYPE_CHECKING:
    from collections.abc import Mapping
    from contextvars import Token

    from amqp_agents.models.envelope import Envelope, HeaderValue

__all__ = [
    "MessageContext",
    "current_context",
    "event_scope",
    "maybe_context",
    "request_scope",
    "use_context",
]

_NO_HEADERS: Final[Mapping[str, HeaderValue]] = MappingProxyType({})


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageContext:
    """The request (or event) a handler is running for, as it came off the wire.

    Every field has a default, so a unit test builds just what it needs:
    ``MessageContext(message_id="m1", attempt=2)``.
    """

    message_id: str = ""
    """The AMQP ``message_id``: the key to deduplicate on (kept across retries)."""
    correlation_id: str | None = None
    """The AMQP ``correlation_id`` (the caller matches the reply on it)."""
    causation_id: str | None = None
    """The ``message_id`` of the message whose handler sent this one (``x-causation-id``)."""
    attempt: int = 1
    """Which delivery this is (``x-attempt``; 1 when absent). In-process tries share it."""
    deadline: float | None = None
    """When the caller stops waiting, epoch seconds (``x-deadline``); ``None``: no bound."""
    priority: int | None = None
    """The AMQP ``priority``; ``None`` when the message had none (events, usually)."""
    redelivered: bool = False
    """The broker delivered it before and it was not acked: the work may have run."""
    headers: Mapping[str, HeaderValue] = field(default_factory=lambda: _NO_HEADERS, hash=False)
    """Every AMQP header, read-only."""
    agent: str | None = None
    """The agent the request is for; ``None`` for an event."""
    action: str | None = None
    """The action requested; ``None`` for an event."""
    event_type: str | None = None
    """The event's type; ``None`` for a request."""

    @property
    def event_id(self) -> str | None:
        """The event's id (its ``message_id``); ``None`` for a request."""
        return None if self.event_type is None else self.message_id

    def time_left_s(self) -> float | None:
        """Seconds until :attr:`deadline` (negative once passed); ``None``: no deadline."""
        return None if self.deadline is None else self.deadline - time.time()

    @classmethod
    def of_request(cls, envelope: Envelope, agent: str) -> MessageContext:
        """The context of a request delivered to ``agent``."""
        return cls.of_delivery(envelope, agent=agent, action=envelope.type)

    @classmethod
    def of_event(cls, envelope: Envelope, event_type: str) -> MessageContext:
        """The context of an event (or a question) delivered to a subscriber."""
        return cls.of_delivery(envelope, event_type=event_type)

    @classmethod
    def of_delivery(
        cls,
        envelope: Envelope,
        *,
        agent: str | None = None,
        action: str | None = None,
        event_type: str | None = None,
    ) -> MessageContext:
        """The context of any delivered message, named as the arguments say."""
        headers = envelope.headers
        causation = None if headers is None else headers.get(HEADER_CAUSATION_ID)
        return cls(
            message_id=envelope.message_id or "",
            correlation_id=envelope.correlation_id,
            causation_id=causation if isinstance(causation, str) else None,
            attempt=attempt_from(envelope),
            deadline=deadline_from(envelope),
            priority=envelope.priority,
            redelivered=envelope.redelivered,
            headers=_NO_HEADERS if headers is None else MappingProxyType(headers),
            agent=agent,
            action=action,
            event_type=event_type,
        )


class _Delivered:
    """A delivery whose context is built when first asked for: most handlers never ask,
    and building one costs more than setting the variable (a frozen dataclass)."""

    __slots__ = ("_agent", "_built", "_envelope", "_event_type")

    def __init__(self, envelope: Envelope, agent: str | None, event_type: str | None) -> None:
        self._envelope = envelope
        self._agent = agent
        self._event_type = event_type
        self._built: MessageContext | None = None

    def context(self) -> MessageContext:
        built = self._built
        if built is None:
            envelope = self._envelope
            action = None if self._agent is None else envelope.type
            built = self._built = MessageContext.of_delivery(
                envelope, agent=self._agent, action=action, event_type=self._event_type
            )
        return built


_current: Final[ContextVar[MessageContext | _Delivered | None]] = ContextVar(
    "amqp_agents_message_context", default=None
)


def current_context() -> MessageContext:
    """The context of the message the running handler handles.

    Raises:
        LifecycleError: called outside a handler (nothing set it); in a unit test, wrap
            the call in :func:`use_context`.
    """
    context = _current.get()
    if context is None:
        raise LifecycleError(
            "current_context() is only available while a handler runs (in a unit test,"
            " set one with amqp_agents.testing.use_context(MessageContext(...)))"
        )
    return context if isinstance(context, MessageContext) else context.context()


def maybe_context() -> MessageContext | None:
    """The running handler's context, or ``None`` outside a handler (for the library's
    own clients, which behave as before when no handler calls them)."""
    context = _current.get()
    if context is None or isinstance(context, MessageContext):
        return context
    return context.context()


class use_context:  # lower case: used like a function: ``with use_context(ctx):``
    """Make ``context`` the current one inside the ``with`` block (and in the tasks
    started there); the previous one is back on the way out, whatever happens.

    A class rather than a generator: the worker enters one per request.
    """

    __slots__ = ("_context", "_token")

    def __init__(self, context: MessageContext | _Delivered) -> None:
        self._context = context
        self._token: Token[MessageContext | _Delivered | None] | None = None

    def __enter__(self) -> None:
        self._token = _current.set(self._context)

    def __exit__(self, *_exc_info: object) -> None:
        if self._token is not None:
            _current.reset(self._token)
            self._token = None


def request_scope(envelope: Envelope, agent: str) -> use_context:
    """The context of a request delivered to ``agent``, current inside the ``with``."""
    return use_context(_Delivered(envelope, agent, None))


def event_scope(envelope: Envelope, event_type: str) -> use_context:
    """The context of an event delivered to a subscriber, current inside the ``with``."""
    return use_context(_Delivered(envelope, None, event_type))
