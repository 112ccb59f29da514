"""The messages agents exchange: requests, replies and the standard error codes.

These are the in-process shapes. How they map onto AMQP properties and JSON bodies is
the job of :mod:`amqp_agents.models.wire` and is documented in ``docs/protocol.md``.
"""

from __future__ import annotations

import itertools
import os
import uuid
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from amqp_agents.errors import AgentError, ErrorCode

__all__ = [
    "MAX_ACTION_LENGTH",
    "AgentMessage",
    "AgentResponse",
    "ErrorCode",
    "ErrorInfo",
    "Event",
    "IdSource",
    "Priority",
    "new_id",
]


def new_id() -> str:
    """A fresh random id for ``message_id`` / ``correlation_id`` (hex, 32 chars)."""
    return uuid.uuid4().hex


class IdSource:
    """Unique, unguessable ids, cheaply: a random per-source prefix, a counter, and a
    random tag.

    ``uuid4()`` reads the OS entropy pool per call; on the RPC hot path a counter is
    as unique (the 64-bit random prefix separates processes and clients) and faster.
    The tag (48 bits from the OS's CSPRNG, read 4 KiB at a time) makes the next id
    unguessable from one seen: a peer that may publish to the reply queue cannot forge
    the reply of a call it has not seen.
    """

    __slots__ = ("_counter", "_pool", "_pos", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)
        self._pool = b""
        self._pos = 0

    def next(self) -> str:
        """The next id: ``<16 hex chars>.<n>.<12 hex chars>``."""
        pos = self._pos
        if pos + _TAG_BYTES > len(self._pool):
            self._pool, pos = os.urandom(_TAG_POOL_BYTES), 0
        self._pos = pos + _TAG_BYTES
        tag = self._pool[pos : pos + _TAG_BYTES].hex()
        return f"{self._prefix}.{next(self._counter)}.{tag}"


_TAG_BYTES = 6
_TAG_POOL_BYTES = 4096 - 4096 % _TAG_BYTES


MAX_ACTION_LENGTH = 255
"""Longest action name: the AMQP ``type`` property is a short string."""


class Priority(IntEnum):
    """Request priority, the AMQP ``priority`` property (0-9; higher is served first).

    RabbitMQ only reorders messages that are *waiting* in the queue, so priorities take
    effect when there is a backlog and the worker's prefetch is small.
    """

    LOWEST = 0
    """What a message without a priority property counts as."""
    LOW = 2
    """Background work that may wait."""
    NORMAL = 4
    """The default for requests sent by this library."""
    HIGH = 7
    """Interactive work that should overtake a backlog."""
    CRITICAL = 9
    """The highest level the default queues distinguish."""


class ErrorInfo(BaseModel):
    """The ``error`` object of a failed reply: ``{"code", "message", "details"?}``."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    code: str
    message: str
    details: Any = None

    @classmethod
    def from_error(cls, error: AgentError) -> ErrorInfo:
        """The ``error`` object of the reply an :class:`~amqp_agents.errors.AgentError`
        becomes."""
        return cls(code=error.code, message=error.message, details=error.details)


class AgentMessage(BaseModel):
    """A request to an agent: the action to run and its JSON payload.

    ``deadline`` is when the caller stops waiting; a worker may drop the request
    unanswered once it has passed, since nobody would read the reply.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(default_factory=new_id)
    action: str = Field(min_length=1, max_length=MAX_ACTION_LENGTH)
    payload: dict[str, Any] = Field(default_factory=dict)
    correlation_id: str | None = None
    reply_to: str | None = None
    priority: int = Field(default=Priority.NORMAL, ge=0, le=9)
    """0-9; the :class:`Priority` members name some levels, any value in range works."""
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    deadline: datetime | None = None
    redelivered: bool = False
    """The broker delivered it before and it was not acked: the action may have run."""


class Event(BaseModel):
    """An event as delivered to a subscriber: its type (routing key) and JSON payload.

    ``reply_to``/``correlation_id`` are set when the publisher waits for answers
    (:meth:`~amqp_agents.events.bus.EventBus.publish_and_wait`); ``redelivered`` when
    the broker delivers it again (a previous attempt did not finish).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    type: str
    payload: dict[str, Any] = Field(default_factory=dict)
    timestamp: datetime
    correlation_id: str | None = None
    reply_to: str | None = None
    redelivered: bool = False


class AgentResponse(BaseModel):
    """A reply: ``{"ok": true, "data": ...}`` or ``{"ok": false, "error": {...}}``.

    ``correlation_id`` travels in the AMQP property, not in the JSON body. The factories
    are :meth:`success` and :meth:`failure` rather than ``ok()``/``error()``: those names
    are the wire fields, and a method shadowing ``ok`` would make ``if reply.ok`` always
    true.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    ok: bool
    data: Any = None
    error: ErrorInfo | None = None
    correlation_id: str | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _error_iff_not_ok(self) -> Self:
        if self.ok and self.error is not None:
            raise ValueError("a successful reply carries no error")
        if not self.ok and self.error is None:
            raise ValueError("a failed reply must carry an error object")
        return self

    @classmethod
    def success(cls, data: Any = None, *, correlation_id: str | None = None) -> AgentResponse:
        """A successful reply carrying ``data`` (any JSON-able value or pydantic model)."""
        # __init__ (validation in pydantic-core) is faster than model_construct here.
        return cls(ok=True, data=data, correlation_id=correlation_id)

    @classmethod
    def failure(
        cls,
        code: str,
        message: str,
        *,
        details: Any = None,
        correlation_id: str | None = None,
    ) -> AgentResponse:
        """A failed reply with a stable ``code`` and a human-readable ``message``."""
        info = ErrorInfo(code=str(code), message=message, details=details)
        return cls(ok=False, error=info, correlation_id=correlation_id)

    @classmethod
    def from_error(cls, error: AgentError, *, correlation_id: str | None = None) -> AgentResponse:
        """The failed reply an :class:`~amqp_agents.errors.AgentError` becomes."""
        return cls.failure(
            error.code, error.message, details=error.details, correlation_id=correlation_id
        )

    @property
    def code(self) -> str | None:
        """The error code of a failed reply, ``None`` for a successful one."""
        return None if self.error is None else self.error.code
