"""The message context in process: the accessor, what unit tests can set, how calls and
events made in a handler follow it, the fan-out helper, and a stop ending nested calls."""

from __future__ import annotations

import asyncio
import functools
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from amqp_agents import (
    ActionTimeoutError,
    Agent,
    AgentMessage,
    ErrorCode,
    LifecycleError,
    MessageContext,
    Priority,
    WorkerSettings,
    action,
    current_context,
    gather_limited,
    on_event,
)
from amqp_agents.models.envelope import Envelope
from amqp_agents.models.topology import HEADER_CAUSATION_ID, HEADER_DEADLINE
from amqp_agents.runtime.worker import Worker
from amqp_agents.testing import AgentHarness, use_context
from amqp_agents.transport.memory import InMemoryTransport


class Recorder(Agent):
    """Records the contexts of its requests and events; emits when asked."""

    name = "recorder"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[MessageContext] = []

    @action("note")
    async def note(self, payload: dict[str, Any]) -> str:
        self.seen.append(current_context())
        if payload.get("emit"):
            await self.emit("noted", {})
        return self.context.message_id

    @on_event("noted")
    async def on_noted(self) -> None:
        self.seen.append(current_context())


class Gate(Agent):
    name = "gate"

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()

    @action("hold")
    async def hold(self) -> None:
        self.entered.set()
        await asyncio.Event().wait()


class Relay(Agent):
    """Calls the gate from its handler and records how that call ended."""

    name = "relay"
    calls_agents = True

    def __init__(self) -> None:
        super().__init__()
        self.nested_cancelled = asyncio.Event()

    @action("relay")
    async def relay(self) -> None:
        try:
            await self.rpc.call("gate", "hold", timeout_s=30)
        except asyncio.CancelledError:
            self.nested_cancelled.set()
            raise


def sent_headers(recorder: Recorder) -> dict[str, object]:
    [context] = recorder.seen
    return dict(context.headers)


# -- reading the context -----------------------------------------------------------------


async def test_outside_a_handler_the_context_is_a_clear_error() -> None:
    """current_context() and Agent.context name the way out (use_context in tests)."""
    with pytest.raises(LifecycleError, match="only available while a handler runs"):
        current_context()
    with pytest.raises(LifecycleError, match="use_context"):
        _ = Recorder().context


async def test_a_unit_test_sets_the_context_of_a_direct_call() -> None:
    """AgentHarness.message_context gives a plain method call a context; it is gone after."""
    recorder = Recorder()
    with AgentHarness.message_context(message_id="m1", attempt=2, priority=7):
        assert await recorder.note({}) == "m1"
    [context] = recorder.seen
    assert (context.message_id, context.attempt, context.priority) == ("m1", 2, 7)
    with pytest.raises(LifecycleError):
        current_context()


async def test_handle_gives_the_handler_its_message() -> None:
    """Agent.handle(message) runs the handler in the message's context (attempt 1)."""
    recorder = Recorder()
    deadline = datetime(2100, 1, 1, tzinfo=UTC)
    message = AgentMessage(
        id="m7", action="note", correlation_id="c7", priority=2, deadline=deadline
    )
    reply = await recorder.handle(message)
    assert reply.data == "m7"
    [context] = recorder.seen
    assert (context.correlation_id, context.priority, context.attempt) == ("c7", 2, 1)
    assert context.deadline == deadline.timestamp()
    assert (context.agent, context.action) == ("recorder", "note")


def test_a_context_read_from_an_event_delivery() -> None:
    """An event's context names its id and type, and no agent or action."""
    envelope = Envelope(b"{}", message_id="e1", headers={"x-attempt": 3, HEADER_CAUSATION_ID: 4})
    context = MessageContext.of_event(envelope, "task.created")
    assert (context.event_id, context.event_type, context.attempt) == ("e1", "task.created", 3)
    assert (context.agent, context.action, context.deadline, context.priority) == (
        None,
        None,
        None,
        None,
    )
    assert context.causation_id is None  # not a string: ignored
    assert MessageContext().time_left_s() is None


async def test_event_handlers_see_their_event_and_events_carry_their_cause() -> None:
    """An event emitted by an action names the request (x-causation-id); the event
    handler's context is the event's."""
    recorder = Recorder()
    async with AgentHarness(recorder) as harness:
        message_id = await harness.call("recorder", "note", {"emit": True})
        event = await harness.wait_for_event("noted")
        await harness.wait_until(lambda: len(recorder.seen) == 2, what="the event handled")
    request, handled = recorder.seen
    assert request.message_id == message_id
    assert handled.event_id == event.id
    assert handled.event_type == "noted"
    assert handled.causation_id == message_id
    assert handled.agent is None


# -- calls made in a handler ---------------------------------------------------------


async def test_a_call_past_the_handlers_deadline_is_not_sent() -> None:
    """No time left: send answers TIMEOUT, call and notify raise, nothing is published."""
    recorder = Recorder()
    async with AgentHarness(recorder) as harness:
        with AgentHarness.message_context(deadline=time.time() - 1):
            reply = await harness.client.send("recorder", "note")
            with pytest.raises(ActionTimeoutError, match="deadline"):
                await harness.client.call("recorder", "note")
            with pytest.raises(ActionTimeoutError):
                await harness.client.notify("recorder", "note")
        assert await harness.call("recorder", "note") != ""  # a positive control
    assert reply.code == ErrorCode.TIMEOUT
    assert len(recorder.seen) == 1
    assert harness.worker.stats.received == 1


async def test_a_larger_timeout_is_cut_to_the_handlers_deadline() -> None:
    """A nested call's timeout never outlives the handler's deadline: the parent's
    x-deadline is sent unchanged (in milliseconds)."""
    recorder = Recorder()
    deadline = time.time() + 5
    async with AgentHarness(recorder) as harness:
        with AgentHarness.message_context(message_id="parent", deadline=deadline):
            await harness.client.call("recorder", "note", timeout_s=60)
    headers = sent_headers(recorder)
    assert headers[HEADER_DEADLINE] == round(deadline * 1000)
    assert headers[HEADER_CAUSATION_ID] == "parent"


async def test_a_smaller_timeout_and_an_explicit_priority_win() -> None:
    """Within the handler's deadline the caller's own shorter timeout holds, and a
    priority given explicitly beats the inherited one."""
    recorder = Recorder()
    async with AgentHarness(recorder) as harness:
        with AgentHarness.message_context(deadline=time.time() + 60, priority=Priority.HIGH):
            before = time.time()
            await harness.client.call("recorder", "note", timeout_s=2, priority=Priority.LOW)
    [context] = recorder.seen
    assert context.deadline is not None
    assert before + 2 - 0.5 < context.deadline < before + 2 + 0.5
    assert context.priority == Priority.LOW


async def test_outside_a_handler_calls_are_as_before() -> None:
    """No context: the default priority, a fresh deadline, no causation id."""
    recorder = Recorder()
    async with AgentHarness(recorder) as harness:
        await harness.client.call("recorder", "note", timeout_s=5)
    [context] = recorder.seen
    assert context.priority == Priority.NORMAL
    assert context.causation_id is None
    assert HEADER_CAUSATION_ID not in context.headers


async def test_an_agent_without_an_rpc_client_says_how_to_get_one() -> None:
    """agent.rpc: given by the worker to calls_agents agents only; else a clear error."""
    with pytest.raises(LifecycleError, match="calls_agents = True"):
        _ = Recorder().rpc
    relay, recorder = Relay(), Recorder()
    async with AgentHarness(relay, recorder) as harness:
        assert relay.rpc is harness.worker.rpc
        with pytest.raises(LifecycleError):
            _ = recorder.rpc
    async with AgentHarness(Recorder()) as harness:
        assert harness.worker.rpc is None


async def test_a_stopping_worker_ends_the_nested_calls_of_its_handlers() -> None:
    """Cancelled by the stop (grace period over), a handler's nested call ends with it;
    the client it used has nothing pending."""
    gate, relay = Gate(), Relay()
    async with AgentHarness(gate, settings=WorkerSettings(grace_period_s=0)) as harness:
        transport = InMemoryTransport(harness.broker)
        await transport.connect()
        worker = Worker(transport, [relay], settings=WorkerSettings(grace_period_s=0))
        await worker.start()
        try:
            await harness.client.notify("relay", "relay")
            async with asyncio.timeout(5):
                await gate.entered.wait()
            await worker.stop()
            assert relay.nested_cancelled.is_set()
            assert worker.rpc is not None
            assert worker.rpc.pending_calls == 0
        finally:
            await worker.stop()
            await transport.aclose()


# -- the fan-out helper --------------------------------------------------------------


async def test_gather_limited_keeps_order_and_its_bound() -> None:
    """Results in call order; never more than ``limit`` calls running."""
    running, most = 0, 0

    async def one(n: int) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        running -= 1
        return n

    results = await gather_limited([functools.partial(one, n) for n in range(20)], limit=3)
    assert results == list(range(20))
    assert most == 3
    assert await gather_limited([], limit=1) == []


async def test_gather_limited_raises_the_first_failure_and_starts_nothing_more() -> None:
    """A failure cancels the running calls and the rest never start."""
    started: list[int] = []
    cancelled = asyncio.Event()

    async def one(n: int) -> int:
        started.append(n)
        if n == 1:
            raise ValueError("boom")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return n

    with pytest.raises(ValueError, match="boom"):
        await gather_limited([functools.partial(one, n) for n in range(10)], limit=2)
    assert started == [0, 1]
    assert cancelled.is_set()


async def test_gather_limited_sees_the_callers_context() -> None:
    """The calls run in child tasks that carry the handler's context."""

    async def message_id() -> str:
        return current_context().message_id

    with use_context(MessageContext(message_id="m1")):
        assert await gather_limited([message_id] * 3, limit=2) == ["m1"] * 3
    with pytest.raises(ValueError, match="at least 1"):
        await gather_limited([message_id], limit=0)
