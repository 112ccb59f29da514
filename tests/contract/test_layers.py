"""The layers above the transport behave the same on both: RPC, events, worker stop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any

from amqp_agents.config import WorkerSettings
from amqp_agents.events.bus import EventBus
from amqp_agents.models.messages import ErrorCode
from amqp_agents.models.topology import Topology
from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.agent import Agent, action
from amqp_agents.runtime.worker import Worker
from amqp_agents.transport.base import Transport
from tests.contract.conftest import Backend

TOPOLOGY = Topology()


class Echo(Agent):
    """Answers with its payload."""

    @action("echo")
    async def echo(self, payload: dict[str, Any]) -> dict[str, Any]:
        return payload


class Gate(Agent):
    """Holds every request until ``release`` is set."""

    def __init__(self, *, name: str) -> None:
        super().__init__(name=name)
        self.entered: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.release = asyncio.Event()

    @action("hold")
    async def hold(self, payload: dict[str, Any]) -> dict[str, Any]:
        self.entered.put_nowait(payload)
        await self.release.wait()
        return payload


@contextlib.asynccontextmanager
async def running(
    transport: Transport, agents: Sequence[Agent], **settings: Any
) -> AsyncIterator[Worker]:
    """A started worker, always stopped on the way out."""
    worker = Worker(transport, agents, settings=WorkerSettings(**settings))
    try:
        await worker.start()
        yield worker
    finally:
        await worker.stop()


@contextlib.asynccontextmanager
async def client_on(transport: Transport) -> AsyncIterator[RpcClient]:
    async with RpcClient(transport) as client:
        yield client


# -- RPC -----------------------------------------------------------------------------


async def test_rpc_call_gets_the_reply(backend: Backend) -> None:
    """A call through the broker reaches the agent and returns its answer."""
    agent = Echo(name=backend.unique("echo"))
    async with running(await backend.connect(), [agent]):
        async with client_on(await backend.connect()) as client:
            replies = await asyncio.gather(
                *(client.call(agent.name, "echo", {"n": n}, timeout_s=5) for n in range(5))
            )
            assert client.pending_calls == 0
    assert replies == [{"n": n} for n in range(5)]


async def test_rpc_call_to_an_unserved_agent_is_no_route_at_once(backend: Backend) -> None:
    """NO_ROUTE as soon as the broker returns the request, not at the timeout."""
    async with client_on(await backend.connect()) as client:
        began = time.monotonic()
        response = await client.send(backend.unique("nobody"), "echo", timeout_s=10)
    assert response.error is not None
    assert response.error.code == ErrorCode.NO_ROUTE
    assert time.monotonic() - began < 5


async def test_a_handler_cut_off_at_the_deadline_answers_before_it(backend: Backend) -> None:
    """TIMEOUT by the call's deadline: the worker stops the handler a little before it,
    so the caller gets the worker's TIMEOUT reply (naming the action) rather than its
    own verdict of no reply; nothing arrives late and nothing is left pending. (Late
    replies proper are tested in tests/integration/test_rpc.py.)"""
    agent = Gate(name=backend.unique("gate"))
    async with running(await backend.connect(), [agent]) as worker:
        async with client_on(await backend.connect()) as client:
            # 2 s: the worker keeps back 0.2 s for its answer (a tenth at most), which
            # leaves room for a slow round trip on a loaded machine.
            response = await client.send(agent.name, "hold", {"n": 1}, timeout_s=2.0)
            assert response.error is not None
            assert response.error.code == ErrorCode.TIMEOUT
            assert "action 'hold' took longer than" in response.error.message
            assert await asyncio.wait_for(agent.entered.get(), backend.timeout_s) == {"n": 1}
            await backend.wait_until(lambda: worker.in_flight == 0, "the handler ends")
            assert client.late_replies == 0
            assert client.pending_calls == 0


async def test_pending_rpc_calls_fail_with_connection_lost(backend: Backend) -> None:
    """When the client's connection dies every pending call ends at once."""
    agent = Gate(name=backend.unique("gate"))
    async with running(await backend.connect(), [agent]):
        transport = await backend.connect()
        async with client_on(transport) as client:
            call = asyncio.create_task(client.send(agent.name, "hold", timeout_s=30))
            await asyncio.wait_for(agent.entered.get(), backend.timeout_s)
            await backend.lose_connection(transport)
            response = await asyncio.wait_for(call, backend.timeout_s)
            agent.release.set()
    assert response.error is not None
    assert response.error.code == ErrorCode.CONNECTION_LOST


# -- events --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def bus_on(transport: Transport, **options: Any) -> AsyncIterator[EventBus]:
    bus = EventBus(transport, **options)
    await bus.start()
    try:
        yield bus
    finally:
        await bus.aclose()


class Seen:
    """An event handler that records the ``n`` of every payload."""

    def __init__(self) -> None:
        self.numbers: list[int] = []

    async def handle(self, payload: dict[str, Any]) -> None:
        self.numbers.append(payload["n"])


async def test_every_group_gets_every_event_once(backend: Backend) -> None:
    """Different groups fan out: each handles all events, exactly once."""
    event, total = backend.unique("order") + ".created", 5
    billing, audit = Seen(), Seen()
    async with bus_on(await backend.connect()) as bus:
        await bus.subscribe(event, billing.handle, group=backend.unique("billing"))
        await bus.subscribe(event.split(".")[0] + ".*", audit.handle, group=backend.unique("audit"))
        for n in range(total):
            await bus.publish(event, {"n": n})
        await backend.wait_until(
            lambda: len(billing.numbers) + len(audit.numbers) >= 2 * total, "fan-out"
        )
    assert sorted(billing.numbers) == sorted(audit.numbers) == list(range(total))


async def test_one_group_on_two_connections_shares_the_events(backend: Backend) -> None:
    """Competing consumers: each event handled once, by one of the two members."""
    event, group, total = backend.unique("job") + ".queued", backend.unique("workers"), 10
    pod_a, pod_b = Seen(), Seen()
    async with (
        bus_on(await backend.connect(), prefetch=2) as bus_a,
        bus_on(await backend.connect(), prefetch=2) as bus_b,
        bus_on(await backend.connect()) as publisher,
    ):
        await bus_a.subscribe(event, pod_a.handle, group=group)
        await bus_b.subscribe(event, pod_b.handle, group=group)
        for n in range(total):
            await publisher.publish(event, {"n": n})
        await backend.wait_until(
            lambda: len(pod_a.numbers) + len(pod_b.numbers) >= total, "all handled"
        )
    counts = Counter(pod_a.numbers + pod_b.numbers)
    assert sorted(counts) == list(range(total))
    assert max(counts.values()) == 1
    assert pod_a.numbers, "member A got no events"
    assert pod_b.numbers, "member B got no events"


# -- worker --------------------------------------------------------------------------


async def test_worker_stop_finishes_in_flight_work_and_leaves_the_rest_queued(
    backend: Backend,
) -> None:
    """stop(): consumers cancelled first, in-flight requests answered and acked."""
    agent = Gate(name=backend.unique("gate"))
    queue = TOPOLOGY.agent_queue(agent.name)
    observer = await backend.connect()
    worker = Worker(
        await backend.connect(), [agent], settings=WorkerSettings(concurrency=2, grace_period_s=10)
    )
    await worker.start()
    async with client_on(await backend.connect()) as client:
        call = asyncio.create_task(client.send(agent.name, "hold", {"n": 1}, timeout_s=20))
        await asyncio.wait_for(agent.entered.get(), backend.timeout_s)
        stopping = asyncio.create_task(worker.stop())

        async def consumer_gone() -> bool:
            return (await observer.queue_info(queue)).consumers == 0

        await backend.wait_until(consumer_gone, "the worker to cancel its consumer")
        assert not stopping.done(), "stop() returned while a handler was running"
        await client.notify(agent.name, "hold", {"n": 2}, timeout_s=60)
        agent.release.set()
        await asyncio.wait_for(stopping, backend.timeout_s)
        response = await asyncio.wait_for(call, backend.timeout_s)
    assert response.data == {"n": 1}
    assert (worker.stats.replied, worker.stats.requeued) == (1, 0)
    assert agent.entered.empty()
    assert await backend.ready(observer, queue) == 1
