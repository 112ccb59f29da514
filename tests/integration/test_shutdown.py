"""Graceful shutdown: SIGTERM on a worker process, and Worker.stop() in-process.

Order under test (``Worker.stop``): cancel consumers -> requeue deliveries waiting for a
slot -> let in-flight handlers finish within the grace period -> cancel the rest and
requeue them.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydantic import BaseModel

from amqp_agents.config import WorkerSettings
from amqp_agents.models.rewrites import attempt_from
from amqp_agents.models.topology import Topology
from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.agent import Agent, action
from amqp_agents.runtime.worker import Worker
from amqp_agents.testing import BrokerAdmin
from amqp_agents.transport.base import Delivery
from amqp_agents.transport.rabbitmq import RabbitTransport
from tests.agents_for_tests import CliProcess, cli_env, read_ids
from tests.support import wait_until

Connect = Callable[..., Awaitable[RabbitTransport]]
TOPOLOGY = Topology()


class Job(BaseModel):
    """Payload of ``job``."""

    id: int


@dataclass
class Journal:
    """What gated handlers did, shared by several agents."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Queue[tuple[str, int]] = field(default_factory=asyncio.Queue)
    finished: list[tuple[str, int]] = field(default_factory=list)
    cancelled: list[tuple[str, int]] = field(default_factory=list)


class Gated(Agent):
    """``job`` starts, then waits for the journal's gate before it answers."""

    name = "gated"

    def __init__(self, *, name: str, journal: Journal) -> None:
        super().__init__(name=name)
        self.journal = journal

    @action("job")
    async def job(self, payload: Job) -> Job:
        key = (self.name, payload.id)
        self.journal.started.put_nowait(key)
        try:
            await self.journal.gate.wait()
        except asyncio.CancelledError:
            self.journal.cancelled.append(key)
            raise
        self.journal.finished.append(key)
        return payload


async def declare_agent_queue(transport: RabbitTransport, agent: str) -> str:
    """Let a worker declare the agent's queue (and stop at once), so requests can queue up."""
    placeholder = Worker(transport, [Gated(name=agent, journal=Journal())])
    await placeholder.start()
    await placeholder.stop()
    return TOPOLOGY.agent_queue(agent)


async def total_messages(admin: BrokerAdmin, vhost: str, queue: str) -> int:
    """Ready + unacked messages of a queue, as the broker reports them."""
    rows = await asyncio.to_thread(admin.list_queues, vhost)
    return rows[queue].messages


async def take_deliveries(transport: RabbitTransport, queue: str, count: int) -> list[Delivery]:
    """Consume ``count`` deliveries from ``queue`` (unsettled), then cancel the consumer."""
    got: list[Delivery] = []
    enough = asyncio.Event()

    async def on_delivery(delivery: Delivery) -> None:
        got.append(delivery)
        if len(got) >= count:
            enough.set()

    consumer = await transport.consume(queue, on_delivery, prefetch=count)
    try:
        await asyncio.wait_for(enough.wait(), 5)
    finally:
        await consumer.cancel()
    return got


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_sigterm_drains_in_flight_and_loses_nothing(
    connect: Connect,
    unique: Callable[[str], str],
    amqp_url: str,
    tmp_path: Path,
) -> None:
    """SIGTERM mid-backlog: exit 0 within the grace period, nothing lost, a second worker drains."""
    total, concurrency, grace_s = 3000, 8, 5.0
    name = unique("drain")
    record = tmp_path / "handled.txt"
    transport = await connect()
    queue = await declare_agent_queue(transport, name)
    async with RpcClient(transport) as client:
        limit = asyncio.Semaphore(200)

        async def enqueue(i: int) -> None:
            async with limit:
                await client.notify(name, "work", {"id": i}, timeout_s=600)

        await asyncio.gather(*(enqueue(i) for i in range(total)))
    assert (await transport.queue_info(queue)).messages == total

    args = ["--url", amqp_url, "run", "tests.agents_for_tests:recorder"]
    args += ["--concurrency", str(concurrency), "--grace-period", str(grace_s)]
    env = cli_env(AAT_AGENT_NAME=name, AAT_RECORD_PATH=str(record), AAT_DELAY_MS="5,20")

    first = CliProcess(args, env=env, log_dir=tmp_path)
    try:
        await wait_until(
            lambda: first.running() and len(read_ids(record)) >= total // 3,
            timeout_s=60,
            what="the first worker to handle a third of the backlog",
        )
        first.terminate()
        signalled = time.monotonic()
        code = await first.await_exit(grace_s + 15)
        exit_s = time.monotonic() - signalled
    finally:
        first.close()
    assert code == 0, first.output()
    assert exit_s < grace_s, f"exit took {exit_s:.1f}s"

    async def accounted() -> bool:
        return len(set(read_ids(record))) + (await transport.queue_info(queue)).messages >= total

    # Unacked deliveries return to the queue once the broker has closed the channel.
    await wait_until(accounted, timeout_s=10, what="every request handled or queued")
    handled = read_ids(record)
    queued = (await transport.queue_info(queue)).messages
    assert 0 < queued < total, "SIGTERM did not land mid-backlog"
    overlap = len(set(handled)) + queued - total
    assert overlap <= concurrency, f"{overlap} requests both handled and requeued"

    second = CliProcess(args, env=env, log_dir=tmp_path)
    try:

        async def drained() -> bool:
            done = second.running() and len(set(read_ids(record))) == total
            return done and (await transport.queue_info(queue)).messages == 0

        await wait_until(drained, timeout_s=60, what="the second worker to drain the queue")
        second.terminate()
        code = await second.await_exit(grace_s + 15)
    finally:
        second.close()
    assert code == 0, second.output()

    handled = read_ids(record)
    assert set(handled) == set(range(total))
    duplicates = sum(n - 1 for n in Counter(handled).values())
    assert duplicates <= concurrency, f"{duplicates} duplicates"
    assert (await transport.queue_info(queue)).messages == 0


async def test_sigterm_past_grace_period_requeues_the_overrunning_request(
    connect: Connect, unique: Callable[[str], str], amqp_url: str, tmp_path: Path
) -> None:
    """A handler still running when --grace-period ends is cancelled; exit 0; request requeued."""
    name, record = unique("overrun-cli"), tmp_path / "ids"
    transport = await connect()
    queue = await declare_agent_queue(transport, name)
    async with RpcClient(transport) as client:
        await client.notify(name, "hold", {"id": 7}, timeout_s=600)  # never released
    env = cli_env(AAT_AGENT_NAME=name, AAT_RECORD_PATH=str(record))
    args = ["--url", amqp_url, "run", "tests.agents_for_tests:recorder", "--grace-period", "1"]
    worker = CliProcess(args, env=env, log_dir=tmp_path)
    try:
        await wait_until(
            lambda: worker.running() and read_ids(record) == [7],
            timeout_s=20,
            what="the hold request to be in flight",
        )
        worker.terminate()
        signalled = time.monotonic()
        code = await worker.await_exit(15)
        exit_s = time.monotonic() - signalled
    finally:
        worker.close()
    assert code == 0, worker.output()
    assert 1 <= exit_s < 4, f"exit took {exit_s:.1f}s"
    (delivery,) = await take_deliveries(transport, queue, 1)
    assert delivery.envelope.redelivered
    assert delivery.envelope.type == "hold"
    await delivery.ack()


async def test_stop_lets_in_flight_handlers_finish_and_ack(
    connect: Connect,
    unique: Callable[[str], str],
    broker_admin: BrokerAdmin,
    module_vhost: str,
) -> None:
    """stop() cancels the consumer first, then waits for in-flight handlers, which reply and ack."""
    journal = Journal()
    agent = Gated(name=unique("grace"), journal=journal)
    queue = TOPOLOGY.agent_queue(agent.name)
    settings = WorkerSettings(concurrency=4, grace_period_s=10)
    worker = Worker(await connect(), [agent], settings=settings)
    await worker.start()
    client_transport = await connect()
    async with RpcClient(client_transport) as client:
        calls = [
            asyncio.create_task(client.send(agent.name, "job", {"id": i}, timeout_s=20))
            for i in range(4)
        ]
        for _ in range(4):
            await asyncio.wait_for(journal.started.get(), 5)

        stopping = asyncio.create_task(worker.stop())

        async def consumer_gone() -> bool:
            return (await client_transport.queue_info(queue)).consumers == 0

        await wait_until(consumer_gone, timeout_s=5, what="the worker to cancel its consumer")
        assert not stopping.done(), "stop() returned while handlers were still running"
        await client.notify(agent.name, "job", {"id": 99}, timeout_s=60)  # stays queued

        journal.gate.set()
        await asyncio.wait_for(stopping, 5)
        replies = await asyncio.wait_for(asyncio.gather(*calls), 5)

    assert [reply.data for reply in replies] == [{"id": i} for i in range(4)]
    assert sorted(journal.finished) == [(agent.name, i) for i in range(4)]
    assert journal.cancelled == []
    assert (worker.stats.replied, worker.stats.requeued) == (4, 0)

    async def only_late_request_left() -> bool:
        return await total_messages(broker_admin, module_vhost, queue) == 1

    await wait_until(only_late_request_left, timeout_s=5, what="4 acks + 1 queued request")


async def test_stop_cancels_overrunning_handlers_and_requeues(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    """Handlers past grace_period_s are cancelled, unanswered and redelivered to a new worker."""
    journal = Journal()
    agent = Gated(name=unique("overrun"), journal=journal)
    queue = TOPOLOGY.agent_queue(agent.name)
    worker = Worker(
        await connect(), [agent], settings=WorkerSettings(concurrency=2, grace_period_s=0.5)
    )
    await worker.start()
    observer = await connect()
    async with RpcClient(await connect()) as client:
        calls = [
            asyncio.create_task(client.send(agent.name, "job", {"id": i}, timeout_s=20))
            for i in range(2)
        ]
        for _ in range(2):
            await asyncio.wait_for(journal.started.get(), 5)

        began = time.monotonic()
        await asyncio.wait_for(worker.stop(), 10)
        stop_s = time.monotonic() - began

        assert 0.5 <= stop_s < 3, f"stop took {stop_s:.2f}s"
        assert sorted(journal.cancelled) == [(agent.name, 0), (agent.name, 1)]
        assert journal.finished == []
        assert (worker.stats.replied, worker.stats.requeued) == (0, 2)
        assert not any(call.done() for call in calls), "a cancelled handler was answered"

        # The worker's transport is still open: the requeue was an explicit nack.
        redelivered = await take_deliveries(observer, queue, 2)
        assert all(d.envelope.redelivered for d in redelivered)
        for delivery in redelivered:
            await delivery.nack(requeue=True)

        journal.gate.set()
        successor = Worker(await connect(), [Gated(name=agent.name, journal=journal)])
        await successor.start()
        try:
            replies = await asyncio.wait_for(asyncio.gather(*calls), 10)
        finally:
            await successor.stop()
    assert [reply.data for reply in replies] == [{"id": 0}, {"id": 1}]


async def test_stop_requeues_deliveries_waiting_for_a_slot(
    connect: Connect,
    unique: Callable[[str], str],
    broker_admin: BrokerAdmin,
    module_vhost: str,
) -> None:
    """With concurrency=1, deliveries waiting for the slot are given back on stop, never
    handled: back in their queues as they came (not redelivered, so not counted as an
    attempt)."""
    journal = Journal()
    # Prefetch is per queue (= concurrency), the slot is per worker: three agents with one
    # request each give one running handler and two deliveries waiting for the slot.
    agents = [Gated(name=unique("slot"), journal=journal) for _ in range(3)]
    worker = Worker(
        await connect(), agents, settings=WorkerSettings(concurrency=1, grace_period_s=10)
    )
    await worker.start()
    observer = await connect()
    async with RpcClient(observer) as client:
        for i, agent in enumerate(agents):
            await client.notify(agent.name, "job", {"id": i}, timeout_s=60)

    running = await asyncio.wait_for(journal.started.get(), 5)
    await wait_until(lambda: worker.stats.received == 3, timeout_s=5, what="all three deliveries")
    assert worker.in_flight == 1

    stopping = asyncio.create_task(worker.stop())
    await wait_until(lambda: worker.stats.requeued == 2, timeout_s=5, what="two waiting requeued")
    journal.gate.set()
    await asyncio.wait_for(stopping, 5)

    assert journal.finished == [running]
    assert journal.started.empty(), "a waiting delivery was handled during stop"
    waiting = [agent.name for agent in agents if agent.name != running[0]]

    async def settled() -> bool:
        rows = await asyncio.to_thread(broker_admin.list_queues, module_vhost)
        counts = {agent.name: rows[TOPOLOGY.agent_queue(agent.name)].messages for agent in agents}
        return counts == {agent.name: int(agent.name in waiting) for agent in agents}

    await wait_until(settled, timeout_s=5, what="running acked, waiting ones back in queue")
    for name in waiting:
        (delivery,) = await take_deliveries(observer, TOPOLOGY.agent_queue(name), 1)
        assert not delivery.envelope.redelivered
        assert attempt_from(delivery.envelope) == 1
        await delivery.nack(requeue=True)
