"""Agents: action registration, the request path of handle(), lifecycle."""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

from amqp_agents.errors import (
    ActionTimeoutError,
    ConfigurationError,
    InvalidPayloadError,
    LifecycleError,
    NotFoundError,
)
from amqp_agents.events.publisher import EmittedEvent, RecordingPublisher
from amqp_agents.models.messages import AgentMessage, ErrorCode, Event
from amqp_agents.runtime.agent import Agent, action, on_event

if TYPE_CHECKING:
    from decimal import Decimal

AGENT_LOGGER = "amqp_agents.runtime.agent"
SHORT_S = 0.02
"""A handler timeout short enough to keep the suite fast."""


class Order(BaseModel):
    """A payload model with constraints and no extra fields."""

    model_config = ConfigDict(extra="forbid")

    item: str
    quantity: int = Field(ge=1)


class Shop(Agent):
    """An agent with one action per behaviour under test."""

    name = "shop"

    def __init__(self, *, name: str | None = None) -> None:
        super().__init__(name=name)
        self.entered = asyncio.Event()
        self.cancelled = False

    @action("order")
    async def order(self, payload: Order) -> dict[str, Any]:
        return {"item": payload.item, "quantity": payload.quantity}

    @action("ping")
    async def ping(self) -> str:
        return "pong"

    @action("echo")
    async def echo(self, payload: dict[str, Any]) -> dict[str, Any]:
        return payload

    @action("untyped")
    async def untyped(self, payload) -> Any:  # type: ignore[no-untyped-def]
        return payload

    @action("missing")
    async def missing(self) -> None:
        raise NotFoundError("no such order", details={"id": 7})

    @action("crash")
    async def crash(self) -> None:
        raise RuntimeError("db password hunter2 rejected")

    @action("upstream_timeout")
    async def upstream_timeout(self) -> None:
        raise TimeoutError("the upstream API timed out")

    @action("own_timeout")
    async def own_timeout(self) -> None:
        raise ActionTimeoutError("gave up waiting for the printer")

    @action("stall")
    async def stall(self) -> None:
        self.entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise

    @action("stall_briefly", timeout_s=SHORT_S)
    async def stall_briefly(self) -> None:
        await asyncio.Event().wait()


def _message(action_name: str, payload: dict[str, Any] | None = None) -> AgentMessage:
    return AgentMessage(action=action_name, payload=payload or {}, correlation_id="c-1")


# -- registration ------------------------------------------------------------------


def test_actions_lists_registered_handlers() -> None:
    """actions() maps each declared action name to its method and timeout."""
    actions = Shop.actions()

    assert set(actions) == {
        "order",
        "ping",
        "echo",
        "untyped",
        "missing",
        "crash",
        "upstream_timeout",
        "own_timeout",
        "stall",
        "stall_briefly",
    }
    assert actions["order"].method == "order"
    assert actions["order"].payload is not None
    assert actions["ping"].payload is None
    assert actions["stall_briefly"].timeout_s == SHORT_S
    assert actions["order"].timeout_s is None


def test_actions_returns_a_copy() -> None:
    """Mutating the result of actions() does not change the agent."""
    Shop.actions().clear()

    assert "order" in Shop.actions()


def test_duplicate_action_names_in_one_class_raise() -> None:
    """Two methods declaring the same action name is a ConfigurationError naming both."""
    with pytest.raises(ConfigurationError, match=r"'x' is declared by both first and second"):

        class Twice(Agent):
            name = "twice"

            @action("x")
            async def first(self) -> None: ...

            @action("x")
            async def second(self) -> None: ...


def test_sync_handler_raises() -> None:
    """Marking a plain def as an action is a ConfigurationError."""
    with pytest.raises(ConfigurationError, match="must be async def"):

        class Sync(Agent):
            name = "sync"

            @action("x")  # type: ignore[type-var]
            def handler(self) -> None: ...


def test_more_than_one_payload_parameter_raises() -> None:
    """A handler with two parameters besides self is a ConfigurationError."""
    with pytest.raises(ConfigurationError, match="one payload argument at most"):

        class TwoArgs(Agent):
            name = "two_args"

            @action("x")
            async def handler(self, payload: Order, extra: int) -> None: ...


@pytest.mark.parametrize("timeout_s", [0, -1.0])
def test_non_positive_action_timeout_raises(timeout_s: float) -> None:
    """An action timeout that is zero or negative is a ConfigurationError."""
    with pytest.raises(ConfigurationError, match="timeout_s must be positive"):
        action("x", timeout_s=timeout_s)


@pytest.mark.parametrize(
    "build",
    [lambda: action("bad name"), lambda: Shop(name="bad name")],
    ids=["action", "agent"],
)
def test_invalid_names_raise_configuration_error(build: Callable[[], object]) -> None:
    """A bad action or agent name is a ConfigurationError like every other bad argument."""
    with pytest.raises(ConfigurationError):
        build()


def test_return_annotation_is_not_evaluated() -> None:
    """Only the payload annotation is resolved; the return type may be a typing-only import."""

    class Billing(Agent):
        name = "billing"

        @action("total")
        async def total(self, payload: Order) -> "Decimal":
            raise NotImplementedError

    assert "total" in Billing.actions()


def test_agent_without_name_raises() -> None:
    """An agent whose class sets no name and gets no name= is a ConfigurationError."""

    class Nameless(Agent):
        pass

    with pytest.raises(ConfigurationError, match="must set a class attribute 'name'"):
        Nameless()
    with pytest.raises(ConfigurationError):
        Agent()


def test_name_override() -> None:
    """name= serves one class under another name without changing the class."""
    shop = Shop(name="shop_eu")

    assert shop.name == "shop_eu"
    assert Shop.name == "shop"
    assert Shop().name == "shop"


def test_subclass_inherits_and_extends_actions() -> None:
    """A subclass serves its parent's actions, its own, and its overrides of handlers."""

    class BigShop(Shop):
        name = "big_shop"

        @action("refund")
        async def refund(self) -> str:
            return "refunded"

        async def ping(self) -> str:
            return "PONG"

    assert set(BigShop.actions()) == set(Shop.actions()) | {"refund"}
    assert "refund" not in Shop.actions()
    assert BigShop.actions()["ping"].method == "ping"


async def test_subclass_override_is_what_handle_runs() -> None:
    """handle() dispatches to the subclass's override of an inherited handler."""

    class LoudShop(Shop):
        async def ping(self) -> str:
            return "PONG"

    reply = await LoudShop().handle(_message("ping"))

    assert reply.data == "PONG"


# -- handlers are plain methods -----------------------------------------------------


async def test_handlers_are_directly_callable() -> None:
    """A handler is a plain coroutine method: call it with a payload model, no request."""
    shop = Shop()

    assert await shop.order(Order(item="tea", quantity=2)) == {"item": "tea", "quantity": 2}
    assert await shop.ping() == "pong"
    with pytest.raises(NotFoundError):
        await shop.missing()


# -- handle() ------------------------------------------------------------------------


async def test_handle_success() -> None:
    """A valid request runs its handler and replies ok with its result."""
    reply = await Shop().handle(_message("order", {"item": "tea", "quantity": 3}))

    assert reply.ok is True
    assert reply.data == {"item": "tea", "quantity": 3}
    assert reply.correlation_id == "c-1"


async def test_handle_passes_raw_payload_to_dict_and_unannotated_handlers() -> None:
    """dict[str, Any] and unannotated payload parameters receive the JSON object as is."""
    shop = Shop()
    payload = {"a": [1, {"b": None}]}

    assert (await shop.handle(_message("echo", payload))).data == payload
    assert (await shop.handle(_message("untyped", payload))).data == payload


async def test_handle_unknown_action_lists_known_actions() -> None:
    """An unknown action replies UNKNOWN_ACTION naming the action and every known one."""
    reply = await Shop().handle(_message("refund"))

    assert reply.code == ErrorCode.UNKNOWN_ACTION
    assert reply.error is not None
    assert "'refund'" in reply.error.message
    known = ", ".join(sorted(Shop.actions()))
    assert f"(known: {known})" in reply.error.message
    assert reply.correlation_id == "c-1"


async def test_handle_unknown_action_on_agent_without_actions() -> None:
    """An agent with event handlers only says so in its UNKNOWN_ACTION reply."""

    class EventsOnly(Agent):
        name = "events_only"

        @on_event("task.*")
        async def seen(self, event: Event) -> None:
            """Never called here."""

    reply = await EventsOnly().handle(_message("anything"))

    assert reply.error is not None
    assert "(known: none)" in reply.error.message


async def test_handle_validation_failure_gives_field_details() -> None:
    """A payload failing the schema replies INVALID_PAYLOAD with {loc,msg,type} per error."""
    reply = await Shop().handle(_message("order", {"quantity": 0, "colour": "chartreuse"}))

    assert reply.code == ErrorCode.INVALID_PAYLOAD
    assert reply.error is not None
    details = reply.error.details
    assert isinstance(details, list)
    assert all(set(detail) == {"loc", "msg", "type"} for detail in details)
    by_loc = {tuple(detail["loc"]): detail["type"] for detail in details}
    assert by_loc == {
        ("item",): "missing",
        ("quantity",): "greater_than_equal",
        ("colour",): "extra_forbidden",
    }
    assert "chartreuse" not in str(details)  # the rejected input is not echoed back


async def test_handle_agent_error_gives_its_code() -> None:
    """An AgentError raised by a handler becomes a reply with its code, message and details."""
    reply = await Shop().handle(_message("missing"))

    assert reply.code == ErrorCode.NOT_FOUND
    assert reply.error is not None
    assert reply.error.message == "no such order"
    assert reply.error.details == {"id": 7}
    assert reply.correlation_id == "c-1"


async def test_handle_action_timeout_error_from_handler_is_timeout() -> None:
    """A handler raising ActionTimeoutError itself replies TIMEOUT with its message."""
    reply = await Shop().handle(_message("own_timeout"), timeout_s=5)

    assert reply.code == ErrorCode.TIMEOUT
    assert reply.error is not None
    assert reply.error.message == "gave up waiting for the printer"


async def test_handle_unexpected_exception_is_internal_error_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unexpected exception replies INTERNAL_ERROR without its text; the traceback is logged."""
    with caplog.at_level(logging.ERROR, logger=AGENT_LOGGER):
        reply = await Shop().handle(_message("crash"))

    assert reply.code == ErrorCode.INTERNAL_ERROR
    assert reply.error is not None
    assert "hunter2" not in reply.error.message
    assert "RuntimeError" not in reply.error.message
    assert "c-1" in reply.error.message
    assert reply.error.details is None
    [record] = [r for r in caplog.records if r.name == AGENT_LOGGER]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert record.exc_info[0] is RuntimeError
    assert "hunter2" in caplog.text
    assert "shop.crash" in record.getMessage()


async def test_handle_slow_handler_times_out_and_is_cancelled() -> None:
    """A handler still running at the handle() timeout is cancelled and replies TIMEOUT."""
    shop = Shop()

    reply = await shop.handle(_message("stall"), timeout_s=SHORT_S)

    assert reply.code == ErrorCode.TIMEOUT
    assert reply.error is not None
    assert f"took longer than {SHORT_S:g}s" in reply.error.message
    assert shop.cancelled


async def test_handle_quick_timeout_error_is_internal_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A handler raising TimeoutError before its limit replies INTERNAL_ERROR, not TIMEOUT."""
    with caplog.at_level(logging.ERROR, logger=AGENT_LOGGER):
        reply = await Shop().handle(_message("upstream_timeout"), timeout_s=5)

    assert reply.code == ErrorCode.INTERNAL_ERROR
    assert any(r.exc_info and r.exc_info[0] is TimeoutError for r in caplog.records)


async def test_handle_timeout_error_without_limit_is_internal_error() -> None:
    """With no timeout at all, a TimeoutError from the handler is an INTERNAL_ERROR."""
    reply = await Shop().handle(_message("upstream_timeout"))

    assert reply.code == ErrorCode.INTERNAL_ERROR


async def test_action_timeout_wins_when_smaller() -> None:
    """An action's own timeout_s applies when it is below the handle() timeout."""
    reply = await Shop().handle(_message("stall_briefly"), timeout_s=30)

    assert reply.code == ErrorCode.TIMEOUT
    assert reply.error is not None
    assert f"took longer than {SHORT_S:g}s" in reply.error.message


async def test_handle_timeout_wins_when_smaller() -> None:
    """The handle() timeout applies when it is below the action's own timeout_s."""

    class Patient(Agent):
        name = "patient"

        @action("wait", timeout_s=30)
        async def wait(self) -> None:
            await asyncio.Event().wait()

    reply = await Patient().handle(_message("wait"), timeout_s=SHORT_S)

    assert reply.code == ErrorCode.TIMEOUT
    assert reply.error is not None
    assert f"took longer than {SHORT_S:g}s" in reply.error.message


async def test_handle_propagates_cancellation() -> None:
    """Cancelling the task running handle() cancels the handler and raises CancelledError."""
    shop = Shop()
    task = asyncio.create_task(shop.handle(_message("stall")))
    await shop.entered.wait()

    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await task
    assert shop.cancelled


# -- lifecycle ----------------------------------------------------------------------


async def test_start_and_shutdown() -> None:
    """is_running follows start() and shutdown(); shutdown() is idempotent."""
    shop = Shop()
    seen = [shop.is_running]

    await shop.start()
    seen.append(shop.is_running)

    await shop.shutdown()
    await shop.shutdown()
    seen.append(shop.is_running)
    assert seen == [False, True, False]


async def test_start_twice_raises() -> None:
    """A second start() while running is a LifecycleError naming the agent."""
    shop = Shop()
    await shop.start()

    with pytest.raises(LifecycleError, match="'shop' is already running"):
        await shop.start()


async def test_handle_works_without_start() -> None:
    """handle() needs no lifecycle, so unit tests can skip start()."""
    assert (await Shop().handle(_message("ping"))).data == "pong"


# -- events ---------------------------------------------------------------------------


class Listener(Agent):
    """An agent with event handlers in each kind of group."""

    name = "listener"

    @on_event("task.created")
    @on_event("task.completed")
    async def own_group(self, event: Event) -> None: ...

    @on_event("task.#", group="audit")
    async def shared(self, event: Event) -> None: ...

    @on_event("#", broadcast=True)
    async def everywhere(self, event: Event) -> None: ...


def test_event_handlers_resolve_groups() -> None:
    """Handlers default to the agent's group, keep an explicit one, and broadcast has none."""
    listener = Listener(name="listener_eu")

    resolved = {
        (spec.pattern, spec.group, spec.broadcast, spec.method)
        for spec, _handler in listener.event_handlers()
    }

    assert resolved == {
        ("task.created", "listener_eu", False, "own_group"),
        ("task.completed", "listener_eu", False, "own_group"),
        ("task.#", "audit", False, "shared"),
        ("#", None, True, "everywhere"),
    }


def test_event_handlers_are_bound_methods() -> None:
    """Each resolved handler is the agent's own bound method."""
    listener = Listener()

    for spec, handler in listener.event_handlers():
        assert handler == getattr(listener, spec.method)


def test_broadcast_handler_with_group_raises() -> None:
    """broadcast=True with a group is contradictory and a ConfigurationError."""
    with pytest.raises(ConfigurationError, match="broadcast handler has no group"):
        on_event("x", group="g", broadcast=True)


def test_sync_event_handler_raises() -> None:
    """Marking a plain def as an event handler is a ConfigurationError."""
    with pytest.raises(ConfigurationError, match="must be async def"):

        class Sync(Agent):
            name = "sync"

            @on_event("x")  # type: ignore[type-var]
            def handler(self, event: Event) -> None: ...


def test_over_long_pattern_raises() -> None:
    """A pattern over 255 bytes (an AMQP short string) is refused at decoration."""
    with pytest.raises(ValueError, match="longer than 255 bytes"):
        on_event("é" * 128)


async def test_emit_records_by_default() -> None:
    """Without a worker, emit() goes to a RecordingPublisher that keeps type and payload."""
    shop = Shop()

    event_id = await shop.emit("order.placed", {"item": "tea"})

    assert isinstance(shop.events, RecordingPublisher)
    assert list(shop.events.events) == [EmittedEvent("order.placed", {"item": "tea"})]
    assert shop.events.types() == ["order.placed"]
    assert event_id


async def test_emit_rejects_unserialisable_payload() -> None:
    """A payload the real bus could not encode fails in the recorder too."""
    with pytest.raises(InvalidPayloadError):
        await Shop().emit("order.placed", {"at": object()})


def test_each_agent_has_its_own_recorder() -> None:
    """Two agents never share recorded events."""
    assert Shop().events is not Shop().events


async def test_a_successful_outcome_builds_its_reply_model_on_demand() -> None:
    """Agent.run keeps a success's data; .response is the same reply a model would be."""
    outcome = await Shop().run(_message("echo", {"name": "Ada"}))
    assert outcome.ok
    assert not outcome.retryable
    assert outcome.data == {"name": "Ada"}
    response = outcome.response
    assert response.ok
    assert response.data == {"name": "Ada"}
    assert response.correlation_id == "c-1"
    assert outcome.response is response, "built once"
    assert "Ada" in repr(outcome)


async def test_a_failed_outcome_is_not_ok_and_keeps_its_reply() -> None:
    outcome = await Shop().run(_message("nope"))
    assert not outcome.ok
    assert outcome.data is None
    assert outcome.response.code == ErrorCode.UNKNOWN_ACTION
    assert outcome.response.correlation_id == "c-1"


# -- definitions that could never serve: refused at definition or registration -----


def test_agent_with_neither_actions_nor_event_handlers_is_refused() -> None:
    """Registering an agent that serves nothing raises, naming the class and the fix."""

    class Empty(Agent):
        name = "empty"

    with pytest.raises(ConfigurationError, match=r"Empty \(agent 'empty'\) has no actions"):
        Empty()


@pytest.mark.parametrize("decorator", [action, on_event])
def test_decorator_without_parentheses_is_a_clear_error(
    decorator: Callable[[Callable[..., Awaitable[None]]], object],
) -> None:
    """A bare @action / @on_event fails at class definition with the spelling to use."""
    with pytest.raises(ConfigurationError, match=r"write @(action|on_event)\(\"...\"\) above"):

        class Bare(Agent):
            name = "bare"

            @decorator
            async def ping(self) -> None:
                """Never called."""


@pytest.mark.parametrize("annotation", [int, str, bool, list[Order], int | str])
def test_payload_annotation_that_accepts_no_object_is_refused(annotation: Any) -> None:
    """A payload type no JSON object can validate against fails at class definition."""

    async def handler(self: Agent, payload: Any) -> None:
        """Never called."""

    handler.__annotations__["payload"] = annotation
    with pytest.raises(ConfigurationError, match="can never accept a JSON object"):
        type("Bad", (Agent,), {"name": "bad", "go": action("go")(handler)})


@pytest.mark.parametrize("annotation", [Order, Order | None, dict[str, Any], Any])
def test_payload_annotations_that_accept_objects_are_fine(annotation: Any) -> None:
    """Models, optional models, raw dicts and Any all define an action."""

    async def handler(self: Agent, payload: Any) -> None:
        """Never called."""

    handler.__annotations__["payload"] = annotation
    agent_class = type("Good", (Agent,), {"name": "good", "go": action("go")(handler)})
    assert issubclass(agent_class, Agent)
    assert "go" in agent_class.actions()
