"""In-band discovery: every agent answers the reserved action ``$describe`` with its
schemas, the name can never be a user action, and ``emits`` declarations are checked."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jsonschema
import pytest
from pydantic import BaseModel, ConfigDict, Field

from amqp_agents.errors import ConfigurationError
from amqp_agents.examples.tasks import AuditAgent, TaskManager
from amqp_agents.models.messages import AgentMessage, Event
from amqp_agents.models.topology import ACTION_DESCRIBE, check_name
from amqp_agents.runtime.agent import Agent, action, on_event
from amqp_agents.runtime.describe import JSON_SCHEMA_DIALECT, Description

if TYPE_CHECKING:
    from decimal import Decimal


class Point(BaseModel):
    """A point on the grid."""

    model_config = ConfigDict(extra="forbid")

    x: int = Field(ge=0)
    y: int = Field(ge=0)


class Moved(BaseModel):
    """Payload of ``point.moved``."""

    to: Point


class Grid(Agent):
    """An agent with each kind of handler."""

    name = "grid"
    emits = {"point.moved": Moved}  # noqa: RUF012  # a plain dict, as users write it

    @action("move", timeout_s=2)
    async def move(self, payload: Point) -> Point:
        """Move to a point.

        Longer text that is not the summary.
        """
        return payload

    @action("count")
    async def count(self) -> int:
        return 0

    @action("price")
    async def price(self, payload: dict[str, Any]) -> Decimal:  # typing-only import
        raise NotImplementedError

    @on_event("point.*")
    async def seen(self, event: Event) -> None:
        """Watch points."""

    @on_event("grid.reset", group="resets")
    async def reset(self, payload: Point) -> None: ...


async def describe(agent: Agent) -> dict[str, Any]:
    """The ``data`` of the agent's reply to ``$describe``, as it goes on the wire."""
    response = await agent.handle(AgentMessage(action=ACTION_DESCRIBE, correlation_id="c1"))
    assert response.ok, response.error
    assert response.correlation_id == "c1"
    data = response.model_dump(mode="json")["data"]
    assert isinstance(data, dict)
    return data


async def test_describe_lists_actions_with_their_schemas() -> None:
    """Each action's payload and reply schemas, summary and own time limit."""
    answer = await describe(Grid())

    assert answer["agent"] == "grid"
    assert list(answer["actions"]) == ["move", "count", "price"]
    move = answer["actions"]["move"]
    assert move["description"] == "Move to a point."
    assert move["timeout_s"] == 2
    assert move["payload"]["$schema"] == JSON_SCHEMA_DIALECT
    assert move["payload"]["required"] == ["x", "y"]
    assert move["reply"]["title"] == "Point"
    assert answer["actions"]["count"]["reply"]["type"] == "integer"
    # A return type imported only for type checking cannot be described: any JSON value.
    assert answer["actions"]["price"]["reply"] == {"$schema": JSON_SCHEMA_DIALECT}
    Description.model_validate(answer)


async def test_describe_schemas_validate_payloads_like_the_agent() -> None:
    """What the schema accepts the agent accepts; what it refuses the agent refuses."""
    grid = Grid()
    schema = (await describe(grid))["actions"]["move"]["payload"]
    validator = jsonschema.validators.validator_for(schema)(schema)

    for payload in ({"x": 1, "y": 2}, {"x": -1, "y": 2}, {"x": 1}, {"x": 1, "y": 2, "z": 3}):
        reply = await grid.handle(AgentMessage(action="move", payload=payload))
        assert validator.is_valid(payload) == reply.ok, payload


class Opaque:
    """A class pydantic cannot describe (nor validate from JSON)."""


class Holder(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    thing: Opaque | None = None


async def test_types_without_a_schema_are_described_as_anything() -> None:
    """A payload or return type pydantic cannot describe does not break ``$describe``:
    the schema says "any object" (payload) or "any value" (reply)."""

    class Odd(Agent):
        name = "odd"

        @action("hold")
        async def hold(self, payload: Holder) -> Opaque:
            return Opaque()

    answer = await describe(Odd())

    assert answer["actions"]["hold"]["payload"]["type"] == "object"
    assert answer["actions"]["hold"]["reply"] == {"$schema": JSON_SCHEMA_DIALECT}


async def test_describe_lists_subscriptions_and_declared_events() -> None:
    """Handlers with their pattern, group and payload; ``emits`` with its payloads."""
    answer = await describe(Grid())

    subscriptions = [(s["pattern"], s["group"]) for s in answer["subscriptions"]]
    assert subscriptions == [("point.*", "grid"), ("grid.reset", "resets")]
    assert answer["subscriptions"][0]["payload"]["type"] == "object"  # a whole Event
    assert answer["subscriptions"][1]["payload"]["title"] == "Point"
    assert list(answer["emits"]) == ["point.moved"]
    assert "Point" in answer["emits"]["point.moved"]["payload"]["$defs"]


async def test_the_example_agents_describe_themselves() -> None:
    """The example app: every action of each agent, the audit subscription, the events."""
    manager, audit = await describe(TaskManager()), await describe(AuditAgent())

    assert set(manager["actions"]) == set(TaskManager.actions())
    assert set(manager["emits"]) == {"task.created", "task.completed"}
    assert set(audit["actions"]) == {"audit_log"}
    assert [s["pattern"] for s in audit["subscriptions"]] == ["task.*"]


def test_describe_is_not_a_declared_action() -> None:
    """The reserved action is answered by every agent, but listed by none."""
    assert ACTION_DESCRIBE not in Grid.actions()
    assert ACTION_DESCRIBE not in Grid().action_names


def test_the_reserved_name_cannot_be_declared() -> None:
    """``@action("$describe")`` fails at definition, saying why."""
    with pytest.raises(ConfigurationError, match="reserved"):

        class Impostor(Agent):
            name = "impostor"

            @action(ACTION_DESCRIBE)
            async def describe(self) -> None: ...


def test_the_reserved_name_is_outside_the_grammar_but_may_be_sent() -> None:
    """``$`` cannot start a name, so no conforming agent has the action; a client may
    still send it (the RPC client checks names with ``check_name``)."""
    assert check_name("action", ACTION_DESCRIBE) == ACTION_DESCRIBE
    for kind in ("agent", "group", "event type"):
        with pytest.raises(ConfigurationError):
            check_name(kind, ACTION_DESCRIBE)
    with pytest.raises(ConfigurationError):
        check_name("action", "$other")


@pytest.mark.parametrize(
    ("declared", "match"),
    [
        ({"bad name!": Moved}, "invalid event type"),
        ({"point.moved": int}, "can never accept a JSON object"),
        (["point.moved"], "must map event types"),
    ],
    ids=["bad-type", "not-an-object", "not-a-mapping"],
)
def test_a_bad_emits_declaration_fails_at_class_definition(declared: Any, match: str) -> None:
    """``emits`` is checked by the class statement itself, not when someone asks."""
    with pytest.raises(ConfigurationError, match=match):

        class Loud(Agent):
            name = "loud"
            emits = declared

            @action("go")
            async def go(self) -> None: ...
