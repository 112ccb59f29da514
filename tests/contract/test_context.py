"""The message context on both transports: what a handler sees, and what follows a
request across hops (deadline, priority, causation id, cancellation, fan-out bound)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from amqp_agents.bounds import gather_limited
from amqp_agents.config import RetryPolicy, WorkerSettings
from amqp_agents.errors import Retry
from amqp_agents.metrics import Metrics
from amqp_agents.models.context import MessageContext, current_context
from amqp_agents.models.messages import ErrorCode, Priority
from amqp_agents.models.topology import HEADER_CAUSATION_ID, HEADER_DEADLINE, Topology
from amqp_agents.models.wire import decode_reply, encode_request
from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.agent import Agent, action
from amqp_agents.runtime.worker import Worker
from amqp_agents.transport.base import Transport
from tests.contract.conftest import Backend

TOPOLOGY = Topology()


class Recorder(Agent):
    """Records the context of every request; asks for one retry when told to."""

    def __init__(self, *, name: str) -> None:
        super().__init__(name=name)
        self.seen: list[MessageContext] = []

    @action("note")
    async def note(self, payload: dict[str, Any]) -> int:
        context = current_context()
        self.seen.append(context)
        if payload.get("retry_once") and context.attempt == 1:
            raise Retry(delay_s=0.05)
        return context.attempt


class Relay(Agent):
    """Calls ``target.note`` from its handler; records how that call ended."""

    calls_agents = True

    def __init__(self, *, name: str, target: str) -> None:
        super().__init__(name=name)
        self.target = target
        self.seen: list[MessageContext] = []
        self.nested_cancelled = asyncio.Event()
        self.cancelled_at = 0.0

    @action("relay")
    async def relay(self) -> Any:
        self.seen.append(self.context)
        try:
            return await self.rpc.call(self.target, "note", {})
        except asyncio.CancelledError:
            self.cancelled_at = time.time()
            self.nested_cancelled.set()
            raise


class Gate(Agent):
    """Holds its request until ``release`` is set."""

    def __init__(self, *, name: str) -> None:
        super().__init__(name=name)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    @action("hold")
    async def hold(self) -> None:
        self.entered.set()
        await self.release.wait()


class Counter(Agent):
    """Counts the requests it runs at once."""

    def __init__(self, *, name: str) -> None:
        super().__init__(name=name)
        self.in_flight = 0
        self.most = 0
        self.seen: list[MessageContext] = []

    @action("count")
    async def count(self, payload: dict[str, Any]) -> Any:
        self.seen.append(current_context())
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(0.01)  # the work: long enough for calls to overlap
        finally:
            self.in_flight -= 1
        return payload["n"]


class FanOut(Agent):
    """Fans ``n`` calls to ``target.count`` out, ``limit`` at a time."""

    calls_agents = True

    def __init__(self, *, name: str, target: str) -> None:
        super().__init__(name=name)
        self.target = target
        self.seen: list[MessageContext] = []

    @action("fan")
    async def fan(self, payload: dict[str, Any]) -> list[Any]:
        self.seen.append(self.context)
        calls = [
            functools.partial(self.rpc.call, self.target, "count", {"n": n})
            for n in range(payload["n"])
        ]
        return await gather_limited(calls, limit=payload["limit"])


@contextlib.asynccontextmanager
async def running(
    transport: Transport, agents: Sequence[Agent], metrics: Metrics | None = None, **settings: Any
) -> AsyncIterator[Worker]:
    worker = Worker(transport, agents, settings=WorkerSettings(**settings), metrics=metrics)
    try:
        await worker.start()
        yield worker
    finally:
        await worker.stop()


def header(context: MessageContext, name: str) -> object:
    return context.headers.get(name)


async def test_handler_sees_the_request_as_sent(backend: Backend) -> None:
    """Message id, correlation id, causation id, deadline, priority and headers are the
    ones sent; the attempt is 1, then 2 after a retry, with the same message id."""
    agent = Recorder(name=backend.unique("recorder"))
    retry = RetryPolicy(attempts=1, redelivery_delays_s=(0.05,), max_deliveries=2)
    transport = await backend.connect()
    replies = await backend.queue(transport, "replies", exclusive=True, durable=False)
    inbox = await backend.consume(transport, replies)
    async with running(await backend.connect(), [agent], retry=retry):
        request = encode_request(
            TOPOLOGY,
            agent.name,
            "note",
            b'{"retry_once": true}',
            message_id="message-1",
            correlation_id="correlation-1",
            reply_to=replies,
            priority=7,
            timeout_s=30,
            max_bytes=1024,
            causation_id="parent-1",
        )
        await transport.publish(request, mandatory=True, timeout_s=5)
        reply = decode_reply((await inbox.next()).envelope)
    assert request.headers is not None
    sent_deadline = request.headers[HEADER_DEADLINE]
    assert reply.ok
    assert reply.data == 2
    assert [context.attempt for context in agent.seen] == [1, 2]
    for context in agent.seen:
        assert context.message_id == "message-1"
        assert context.correlation_id == "correlation-1"
        assert context.causation_id == "parent-1"
        assert context.priority == 7
        assert isinstance(sent_deadline, int)
        assert context.deadline == sent_deadline / 1000
        assert header(context, HEADER_DEADLINE) == sent_deadline
        assert (context.agent, context.action, context.event_type) == (agent.name, "note", None)
        assert context.event_id is None
        assert context.redelivered is False
    left = agent.seen[0].time_left_s()
    assert left is not None
    assert 0 < left <= 30


async def test_nested_call_inherits_deadline_priority_and_causation(backend: Backend) -> None:
    """A call made in a handler carries the handler's x-deadline unchanged (not a fresh
    default timeout), its priority, and its message id as the causation id."""
    inner = Recorder(name=backend.unique("inner"))
    relay = Relay(name=backend.unique("relay"), target=inner.name)
    async with (
        running(await backend.connect(), [inner, relay]),
        RpcClient(await backend.connect()) as client,
    ):
        assert await client.call(relay.name, "relay", timeout_s=5, priority=Priority.HIGH) == 1
    [outer_context], [inner_context] = relay.seen, inner.seen
    assert header(outer_context, HEADER_DEADLINE) is not None
    assert header(inner_context, HEADER_DEADLINE) == header(outer_context, HEADER_DEADLINE)
    assert inner_context.deadline == outer_context.deadline
    assert inner_context.priority == outer_context.priority == Priority.HIGH
    assert inner_context.causation_id == outer_context.message_id
    assert header(inner_context, HEADER_CAUSATION_ID) == outer_context.message_id
    assert outer_context.causation_id is None


async def test_cancelled_outer_call_ends_the_nested_one_and_downstream_drops_it(
    backend: Backend,
) -> None:
    """The outer handler's time limit (its caller's deadline) cancels its nested call at
    once; the downstream worker, busy until after the deadline, drops the nested request
    unhandled and counts it (stats and the ``expired`` metric)."""
    gate = Gate(name=backend.unique("gate"))
    sink = Recorder(name=backend.unique("sink"))
    relay = Relay(name=backend.unique("relay"), target=sink.name)
    metrics = Metrics()
    async with (
        running(await backend.connect(), [gate, sink], metrics, concurrency=1) as downstream,
        running(await backend.connect(), [relay]),
        RpcClient(await backend.connect()) as client,
    ):
        holding = asyncio.ensure_future(client.send(gate.name, "hold", timeout_s=10))
        try:
            async with asyncio.timeout(backend.timeout_s):
                await gate.entered.wait()  # the downstream worker's only slot is taken
            reply = await client.send(relay.name, "relay", timeout_s=0.5)
            assert reply.code == ErrorCode.TIMEOUT
            async with asyncio.timeout(backend.timeout_s):
                await relay.nested_cancelled.wait()
            [outer] = relay.seen
            assert outer.deadline is not None
            assert relay.cancelled_at < outer.deadline  # ended by its handler, not later
            assert relay.rpc.pending_calls == 0
            await backend.wait_until(
                lambda: time.time() > (outer.deadline or 0), "the deadline passed"
            )
            assert downstream.stats.expired == 0
        finally:
            gate.release.set()
            assert (await holding).ok
        await backend.wait_until(lambda: downstream.stats.expired == 1, "the drop")
    assert sink.seen == []
    expired = metrics.registry.get_sample_value(
        "amqp_agents_messages_handled_total",
        {"agent": sink.name, "action": "note", "outcome": "expired"},
    )
    assert expired == 1


async def test_fan_out_of_50_calls_keeps_5_in_flight(backend: Backend) -> None:
    """gather_limited(limit=5) in a handler: 50 nested calls, never more than 5 running
    at the downstream agent (which could run all 50 at once); each follows the request."""
    counter = Counter(name=backend.unique("counter"))
    fan = FanOut(name=backend.unique("fan"), target=counter.name)
    async with (
        running(await backend.connect(), [counter], concurrency=64),
        running(await backend.connect(), [fan]),
        RpcClient(await backend.connect()) as client,
    ):
        result = await client.call(
            fan.name, "fan", {"n": 50, "limit": 5}, timeout_s=20, priority=Priority.LOW
        )
    assert result == list(range(50))
    assert counter.most == 5
    [outer] = fan.seen
    assert len(counter.seen) == 50
    for context in counter.seen:
        assert context.causation_id == outer.message_id
        assert header(context, HEADER_DEADLINE) == header(outer, HEADER_DEADLINE)
        assert context.priority == Priority.LOW
