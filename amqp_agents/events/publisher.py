"""What an agent needs to emit events, and a recorder for tests.

Agents depend on the small :class:`EventPublisher` protocol, not on the bus: a
worker gives each agent its :class:`~amqp_agents.events.bus.EventBus`; a unit test
leaves the default :class:`RecordingPublisher` and inspects what was emitted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from amqp_agents.models.wire import dump_json

if TYPE_CHECKING:
    from pydantic import BaseModel

__all__ = ["EmittedEvent", "EventPublisher", "RecordingPublisher"]


class EventPublisher(Protocol):
    """Publishes events to the topic exchange."""

    async def publish(
        self, event_type: str, payload: BaseModel | dict[str, Any] | None = None
    ) -> str:
        """Publish ``payload`` as ``event_type``; return the event id once confirmed."""
        ...


@dataclass(frozen=True, slots=True)
class EmittedEvent:
    """An event a :class:`RecordingPublisher` received."""

    type: str
    payload: Any


class RecordingPublisher:
    """Keeps the last ``maxlen`` published events in memory (for tests; never sends).

    Payloads are encoded like the real bus would, so a payload that could not be
    published fails here too.
    """

    def __init__(self, maxlen: int = 1000) -> None:
        self.events: deque[EmittedEvent] = deque(maxlen=maxlen)

    async def publish(
        self, event_type: str, payload: BaseModel | dict[str, Any] | None = None
    ) -> str:
        dump_json(payload)
        self.events.append(EmittedEvent(event_type, payload))
        return f"recorded-{len(self.events)}"

    def types(self) -> list[str]:
        """The types of the recorded events, oldest first."""
        return [event.type for event in self.events]
