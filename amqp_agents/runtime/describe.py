"""What an agent accepts and sends, read from its handlers: the one source of its contract.

Two things are built from it: the answer to the reserved action ``$describe``
(in-band discovery: a service in any language asks a running agent what it accepts)
and the AsyncAPI document (:mod:`amqp_agents.contract.asyncapi`). Both read the same
:class:`AgentContract`, so they cannot disagree with each other or with the handlers
that run: the payload schema of an action *is* the validator its requests go through.

The ``$describe`` answer (the ``data`` of a successful reply)::

    {
      "agent": "task_manager",
      "actions": {
        "task_add": {"payload": {...}, "reply": {...}, "description": "...",
                     "timeout_s": null}
      },
      "subscriptions": [{"pattern": "task.*", "group": "audit", "payload": {...}}],
      "emits": {"task.created": {"payload": {...}}}
    }

Every schema is a self-contained JSON Schema, draft 2020-12 (what pydantic generates:
``$schema`` says so, ``$defs`` are inside), so a client validates a payload with any
JSON Schema library and nothing else. ``payload`` is the request's body (a JSON
object); ``reply`` is the ``data`` of a successful reply (``{}``: any JSON value, when
the handler's return type is not annotated or not describable). ``group`` is ``null``
for a broadcast subscription. ``emits`` lists what the agent declares in
:attr:`~amqp_agents.runtime.agent.Agent.emits`, not what it may publish undeclared.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from pydantic.errors import PydanticUserError

from amqp_agents.errors import ConfigurationError
from amqp_agents.models.messages import Event
from amqp_agents.models.schema import (
    adapter_for,
    check_accepts_object,
    handler_argument,
    handler_result,
)
from amqp_agents.models.topology import check_name

if TYPE_CHECKING:
    from collections.abc import Callable

    from pydantic.json_schema import JsonSchemaMode as _Mode

    from amqp_agents.runtime.agent import Agent

__all__ = [
    "JSON_SCHEMA_DIALECT",
    "ActionContract",
    "ActionInfo",
    "AgentContract",
    "DeclaredEvent",
    "Description",
    "EventInfo",
    "SubscriptionContract",
    "SubscriptionInfo",
    "check_emits",
    "contract_of",
]

JSON_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
"""The dialect of every schema in the ``$describe`` answer."""

_ANY_OBJECT: Final[TypeAdapter[Any]] = TypeAdapter(dict[str, Any])
_ANY_VALUE: Final[TypeAdapter[Any]] = TypeAdapter(Any)


class ActionInfo(BaseModel):
    """One action in the ``$describe`` answer."""

    model_config = ConfigDict(frozen=True)

    payload: dict[str, Any]
    """JSON Schema of the request body (a JSON object)."""
    reply: dict[str, Any]
    """JSON Schema of the ``data`` of a successful reply."""
    description: str | None = None
    timeout_s: float | None = None
    """The action's own time limit, if it has one (the worker's default applies)."""


class SubscriptionInfo(BaseModel):
    """One ``@on_event`` handler in the ``$describe`` answer."""

    model_config = ConfigDict(frozen=True)

    pattern: str
    """The topic pattern its queue is bound with on the events exchange."""
    group: str | None
    """Its subscriber group (queue ``events.<group>``); ``null``: broadcast."""
    payload: dict[str, Any]
    description: str | None = None


class EventInfo(BaseModel):
    """One declared event type in the ``$describe`` answer."""

    model_config = ConfigDict(frozen=True)

    payload: dict[str, Any]


class Description(BaseModel):
    """The answer to ``$describe``: what the agent accepts and sends (module docstring)."""

    model_config = ConfigDict(frozen=True)

    agent: str
    actions: dict[str, ActionInfo]
    subscriptions: list[SubscriptionInfo] = Field(default_factory=list)
    emits: dict[str, EventInfo] = Field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ActionContract:
    """One action: what its request carries and what its successful reply's ``data`` is."""

    name: str
    payload: TypeAdapter[Any]
    """Validates the request body; any JSON object when the handler takes no payload."""
    reply: TypeAdapter[Any]
    """The handler's return type, described as it is sent (serialisation mode)."""
    takes_payload: bool
    timeout_s: float | None
    description: str | None


@dataclass(frozen=True, slots=True)
class SubscriptionContract:
    """One ``@on_event`` handler: the pattern, the queue it is read from, the payload."""

    pattern: str
    group: str | None
    """The subscriber group (its queue ``events.<group>``); ``None``: broadcast."""
    payload: TypeAdapter[Any]
    description: str | None


@dataclass(frozen=True, slots=True)
class DeclaredEvent:
    """An event type the agent declares it publishes, with its payload."""

    type: str
    payload: TypeAdapter[Any]


@dataclass(frozen=True, slots=True)
class AgentContract:
    """Everything one agent accepts and sends, in declaration order of its class."""

    agent: str
    actions: tuple[ActionContract, ...]
    subscriptions: tuple[SubscriptionContract, ...]
    emits: tuple[DeclaredEvent, ...]

    def describe(self) -> Description:
        """The answer to ``$describe``: every schema self-contained, with ``$schema``."""
        return Description(
            agent=self.agent,
            actions={
                spec.name: ActionInfo(
                    payload=_schema(spec.payload, "validation"),
                    reply=_schema(spec.reply, "serialization"),
                    description=spec.description,
                    timeout_s=spec.timeout_s,
                )
                for spec in self.actions
            },
            subscriptions=[
                SubscriptionInfo(
                    pattern=sub.pattern,
                    group=sub.group,
                    payload=_schema(sub.payload, "validation"),
                    description=sub.description,
                )
                for sub in self.subscriptions
            ],
            emits={
                event.type: EventInfo(payload=_schema(event.payload, "serialization"))
                for event in self.emits
            },
        )


def contract_of(agent: Agent) -> AgentContract:
    """The contract of ``agent``, read from its decorated handlers and ``emits``.

    Raises:
        ConfigurationError: an ``emits`` declaration is invalid (see :func:`check_emits`).
    """
    cls = type(agent)
    actions = []
    for spec in cls.actions().values():
        method = getattr(cls, spec.method)
        actions.append(
            ActionContract(
                name=spec.name,
                payload=_described(spec.payload, "validation", fallback=_ANY_OBJECT),
                reply=_describable(handler_result(method), "serialization"),
                takes_payload=spec.payload is not None,
                timeout_s=spec.timeout_s,
                description=_summary(method),
            )
        )
    subscriptions = []
    for handler_spec, handler in agent.event_handlers():
        what = f"event handler {handler_spec.pattern!r}"
        annotation = handler_argument(handler, bound=False, what=what)
        # An ``Event`` argument receives the whole event: its body is any JSON object.
        if annotation is None or annotation is Event:
            annotation = dict[str, Any]
        subscriptions.append(
            SubscriptionContract(
                pattern=handler_spec.pattern,
                group=handler_spec.group,
                payload=_describable(annotation, "validation"),
                description=_summary(handler),
            )
        )
    emits = tuple(
        DeclaredEvent(event_type, adapter)
        for event_type, adapter in check_emits(cls.emits, where=cls.__qualname__).items()
    )
    return AgentContract(agent.name, tuple(actions), tuple(subscriptions), emits)


def check_emits(emits: Mapping[str, Any], *, where: str) -> dict[str, TypeAdapter[Any]]:
    """Validate an ``emits`` declaration: event type -> payload type (a pydantic model
    or ``dict[str, Any]``); returns a validator per type.

    Raises:
        ConfigurationError: not a mapping, an invalid event type, or a payload type
            that cannot be a JSON object.
    """
    if not isinstance(emits, Mapping):
        raise ConfigurationError(
            f"{where}.emits must map event types to payload types, not {emits!r}"
        )
    adapters = {}
    for event_type, annotation in emits.items():
        check_name("event type", event_type)
        adapter = adapter_for(annotation)
        check_accepts_object(adapter, what=f"{where}.emits[{event_type!r}]")
        adapters[event_type] = adapter
    return adapters


def _describable(annotation: Any, mode: _Mode) -> TypeAdapter[Any]:
    """A validator for ``annotation`` if pydantic can describe it, else one for any
    JSON value (an arbitrary class returned by a handler is not a contract failure)."""
    try:
        adapter = TypeAdapter(annotation)
    except PydanticUserError:
        return _ANY_VALUE
    return _described(adapter, mode, fallback=_ANY_VALUE)


def _described(
    adapter: TypeAdapter[Any] | None, mode: _Mode, *, fallback: TypeAdapter[Any]
) -> TypeAdapter[Any]:
    """``adapter`` if it has a JSON schema in ``mode`` (a payload type holding arbitrary
    classes has none), else ``fallback``."""
    if adapter is None:
        return fallback
    try:
        adapter.json_schema(mode=mode)
    except PydanticUserError:
        return fallback
    return adapter


def _schema(adapter: TypeAdapter[Any], mode: _Mode) -> dict[str, Any]:
    return {"$schema": JSON_SCHEMA_DIALECT, **adapter.json_schema(mode=mode)}


def _summary(func: Callable[..., Any]) -> str | None:
    """The first paragraph of a handler's docstring: what the action does."""
    doc = inspect.getdoc(func)
    return doc.split("\n\n", 1)[0].replace("\n", " ") if doc else None
