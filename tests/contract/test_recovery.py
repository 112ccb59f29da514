"""Consumers that heal themselves, on both transports.

First the transport's promise (every unasked end of a consumer is reported once, with
its reason), then the library's: a deleted queue, a channel closed by the broker or a
lost connection is noticed, re-attached, and never hidden from readiness; after each
fault every consumer of the library is back (the broker's own counts say so).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from amqp_agents.config import RetryPolicy, WorkerSettings
from amqp_agents.errors import BrokerUnavailableError
from amqp_agents.events.bus import EventBus
from amqp_agents.metrics import Metrics
from amqp_agents.models.messages import AgentResponse, ErrorCode
from amqp_agents.models.topology import Topology
from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.agent import Agent
from amqp_agents.runtime.worker import Worker
from amqp_agents.transport.base import ConsumerEnd, EndReason, QueueSpec, Transport
from amqp_agents.transport.recovery import Attachment, AttachmentState, Recovery
from tests.contract.conftest import Backend
from tests.contract.test_layers import Echo, Gate

TOPOLOGY = Topology()


@contextlib.asynccontextmanager
async def started(bus: EventBus) -> AsyncIterator[EventBus]:
    await bus.start()
    try:
        yield bus
    finally:
        await bus.aclose()


class Ends:
    """What ``on_end`` reported, and an event per report."""

    def __init__(self) -> None:
        self.seen: list[ConsumerEnd] = []
        self._new = asyncio.Event()

    def __call__(self, end: ConsumerEnd) -> None:
        self.seen.append(end)
        self._new.set()

    async def first(self, timeout_s: float) -> ConsumerEnd:
        await asyncio.wait_for(self._new.wait(), timeout_s)
        return self.seen[0]


# -- the transport reports every end ------------------------------------------------------


async def test_a_deleted_queue_cancels_its_consumer_once(backend: Backend) -> None:
    """The broker's basic.cancel reaches on_end; a delivery in flight can still be acked
    (the channel stays open for it) and the transport keeps working."""
    transport, observer = await backend.connect(), await backend.connect()
    queue = await backend.queue(observer)
    ends = Ends()
    inbox = await backend.consume(transport, queue, on_end=ends)
    await backend.publish(observer, b"in flight", routing_key=queue)
    await backend.publish(observer, b"waiting", routing_key=queue)
    first, second = await inbox.take(2)
    await observer.delete_queue(queue)
    end = await ends.first(backend.timeout_s)
    assert (end.queue, end.reason) == (queue, EndReason.CANCELLED)
    assert inbox.consumer is not None
    assert inbox.consumer.ended == end
    await first.ack()
    await second.nack(requeue=True)  # its queue is gone: nothing comes back
    other = await backend.queue(observer)
    again = await backend.consume(transport, other)
    await backend.publish(observer, b"after", routing_key=other)
    assert (await again.next()).envelope.body == b"after"
    await inbox.expect_nothing()
    assert len(ends.seen) == 1


async def test_a_channel_closed_by_the_broker_reports_its_code(backend: Backend) -> None:
    """A 406 on the consumer's channel: channel_closed with the code; its unacked
    delivery goes back to the queue and reaches the next consumer, redelivered."""
    transport, observer = await backend.connect(), await backend.connect()
    queue = await backend.queue(observer)
    ends = Ends()
    inbox = await backend.consume(transport, queue, on_end=ends)
    await backend.publish(observer, b"unacked", routing_key=queue)
    await inbox.next()
    assert inbox.consumer is not None
    await backend.close_consumer_channel(transport, inbox.consumer)
    end = await ends.first(backend.timeout_s)
    assert (end.reason, end.code) == (EndReason.CHANNEL_CLOSED, 406)
    successor = await backend.consume(observer, queue)
    back = await successor.next()
    assert (back.envelope.body, back.envelope.redelivered) == (b"unacked", True)
    assert len(ends.seen) == 1


async def test_a_lost_connection_ends_every_consumer_once(backend: Backend) -> None:
    transport, observer = await backend.connect(), await backend.connect()
    queues = [await backend.queue(observer) for _ in range(2)]
    ends = Ends()
    for queue in queues:
        await backend.consume(transport, queue, on_end=ends)
    await backend.lose_connection(transport)

    async def both_reported() -> bool:
        return len(ends.seen) >= 2

    await backend.wait_until(both_reported, "both consumers reported their end")
    assert sorted(e.queue for e in ends.seen) == sorted(queues)
    assert {e.reason for e in ends.seen} == {EndReason.CONNECTION_LOST}


async def test_an_end_the_owner_asked_for_is_not_reported(backend: Backend) -> None:
    transport, observer = await backend.connect(), await backend.connect()
    ends = Ends()
    cancelled = await backend.consume(transport, await backend.queue(observer), on_end=ends)
    closed = await backend.consume(transport, await backend.queue(observer), on_end=ends)
    assert cancelled.consumer is not None
    assert closed.consumer is not None
    await cancelled.consumer.cancel()
    await closed.consumer.close()
    await observer.delete_queue(cancelled.consumer.queue)
    probe = await backend.queue(observer)
    witness = Ends()
    await backend.consume(transport, probe, on_end=witness)
    await observer.delete_queue(probe)  # a positive control on the same transport
    await witness.first(backend.timeout_s)
    assert ends.seen == []
    assert cancelled.consumer.ended is None


# -- the library heals ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def worker_on(
    transport: Transport, agents: Sequence[Agent], **settings: Any
) -> AsyncIterator[tuple[Worker, Metrics]]:
    metrics = Metrics()
    options: dict[str, Any] = {"retry": RetryPolicy(redelivery_delays_s=(0.05,))} | settings
    worker = Worker(transport, agents, settings=WorkerSettings(**options), metrics=metrics)
    try:
        await worker.start()
        yield worker, metrics
    finally:
        await worker.stop()


class Readiness:
    """Readiness as the worker reported it at each state change of a consumer."""

    def __init__(self, worker: Worker) -> None:
        self.seen: list[tuple[AttachmentState, bool, str | None]] = []
        worker.recovery.watch(self._changed)
        self._worker = worker

    def _changed(self, attachment: Attachment) -> None:
        worker = self._worker
        self.seen.append((attachment.state, worker.is_ready, worker.not_ready_reason()))


async def every_consumer_back(backend: Backend, observer: Transport, recovery: Recovery) -> float:
    """Wait until every consumer of ``recovery`` is attached and the broker counts one
    consumer on each of its queues; returns how long that took."""
    started = time.monotonic()

    async def back() -> bool:
        if not recovery.all_attached:
            return False
        for attachment in recovery.attachments:
            try:
                info = await observer.queue_info(attachment.queue)
            except Exception:
                return False
            if info.consumers != 1:
                return False
        return True

    await backend.wait_until(back, "every consumer re-attached (broker's count: 1 each)")
    return time.monotonic() - started


async def stop_load(stop: asyncio.Event, loader: asyncio.Task[None]) -> None:
    stop.set()
    await asyncio.wait({loader}, timeout=10)


def cancels(metrics: Metrics, label: str, reason: EndReason) -> float:
    value = metrics.registry.get_sample_value(
        "amqp_agents_consumer_cancels_total", {"queue": label, "reason": reason.value}
    )
    return value or 0.0


async def test_a_deleted_agent_queue_is_declared_and_consumed_again(backend: Backend) -> None:
    """Under load: the requests that were in the deleted queue are the only ones lost;
    in-flight ones are answered, the consumer is back within 2 s (broker's count),
    readiness was false in between, and every request sent after is answered."""
    gate, echo = Gate(name=backend.unique("gate")), Echo(name=backend.unique("echo"))
    queue = TOPOLOGY.agent_queue(gate.name)
    observer = await backend.connect()
    async with (
        worker_on(await backend.connect(), [gate, echo], concurrency=2) as (worker, metrics),
        RpcClient(await backend.connect()) as client,
        contextlib.AsyncExitStack() as stack,
    ):
        readiness = Readiness(worker)
        load_stop = asyncio.Event()
        load: list[AgentResponse] = []

        async def steady_load() -> None:  # other traffic on the same worker
            n = 0
            while not load_stop.is_set():
                load.append(await client.send(echo.name, "echo", {"n": n}, timeout_s=5))
                n += 1

        loader = asyncio.create_task(steady_load())
        stack.push_async_callback(stop_load, load_stop, loader)
        held = [
            asyncio.create_task(client.send(gate.name, "hold", {"n": n}, timeout_s=1.5))
            for n in range(5)
        ]
        for _ in range(2):  # concurrency 2: two in flight, three wait in the queue
            await asyncio.wait_for(gate.entered.get(), backend.timeout_s)

        async def three_waiting() -> bool:
            return await backend.ready(observer, queue) == 3

        await backend.wait_until(three_waiting, "three requests waiting in the queue")
        dropped = await observer.delete_queue(queue)
        took_s = await every_consumer_back(backend, observer, worker.recovery)
        gate.release.set()
        responses = [await asyncio.wait_for(task, backend.timeout_s + 2) for task in held]
        after = await asyncio.gather(
            *(client.send(gate.name, "hold", {"n": f"after-{n}"}, timeout_s=5) for n in range(5))
        )
        load_stop.set()
        await asyncio.wait_for(loader, backend.timeout_s)

    assert dropped == 3
    assert took_s < 2
    codes = Counter(r.error.code if r.error else "ok" for r in responses)
    assert codes == {"ok": 2, ErrorCode.TIMEOUT: 3}, "only the three in the deleted queue lost"
    assert [r.data for r in after] == [{"n": f"after-{n}"} for n in range(5)]
    assert load, "the steady load ran"
    assert [r.error for r in load if r.error] == []
    gone = [seen for seen in readiness.seen if seen[0] is AttachmentState.REATTACHING]
    assert gone
    assert all(not ready for _state, ready, _why in gone)
    assert f"consumer of {queue}" in (gone[0][2] or "")
    back = readiness.seen[readiness.seen.index(gone[-1]) + 1]
    assert back[:2] == (AttachmentState.ATTACHED, True)
    assert cancels(metrics, queue, EndReason.CANCELLED) == 1
    assert worker.recovery.cancels == 1


async def test_a_channel_closed_under_the_worker_is_consumed_again(backend: Backend) -> None:
    """A 406 on the agent's channel: the in-flight request is redelivered and answered
    once the consumer is back; nothing is lost."""
    echo = Echo(name=backend.unique("echo"))
    observer = await backend.connect()
    async with (
        worker_on(await backend.connect(), [echo]) as (worker, metrics),
        RpcClient(await backend.connect()) as client,
    ):
        assert (await client.send(echo.name, "echo", {"n": 0}, timeout_s=5)).ok
        (attachment,) = [a for a in worker.recovery.attachments if a.label.endswith(echo.name)]
        assert attachment.handle is not None
        await backend.close_consumer_channel(worker_transport(worker), attachment.handle)
        await every_consumer_back(backend, observer, worker.recovery)
        replies = await asyncio.gather(
            *(client.send(echo.name, "echo", {"n": n}, timeout_s=5) for n in range(1, 6))
        )
    assert [r.data for r in replies] == [{"n": n} for n in range(1, 6)]
    label = TOPOLOGY.agent_queue(echo.name)
    assert cancels(metrics, label, EndReason.CHANNEL_CLOSED) == 1


def worker_transport(worker: Worker) -> Transport:
    return worker.recovery.transport


async def test_a_worker_heals_in_place_after_a_lost_connection(backend: Backend) -> None:
    """On a transport that reconnects, the same worker consumes again: no restart."""
    echo = Echo(name=backend.unique("echo"))
    observer = await backend.connect()
    transport = backend.reconnecting_transport()
    await transport.connect()
    async with (
        worker_on(transport, [echo]) as (worker, metrics),
        RpcClient(await backend.connect()) as client,
    ):
        readiness = Readiness(worker)
        await backend.lose_connection(transport)
        await backend.come_back(transport)
        await every_consumer_back(backend, observer, worker.recovery)
        assert worker.is_ready
        assert not worker.consumers_lost
        reply = await client.send(echo.name, "echo", {"n": 1}, timeout_s=5)
    assert reply.data == {"n": 1}
    assert (AttachmentState.REATTACHING, False) in [seen[:2] for seen in readiness.seen]
    label = TOPOLOGY.agent_queue(echo.name)
    assert cancels(metrics, label, EndReason.CONNECTION_LOST) == 1


async def test_a_topology_mismatch_is_not_ready_then_heals(backend: Backend) -> None:
    """Someone re-creates the deleted queue with other arguments: re-attaching fails
    loudly (readiness names the mismatch), not in a hot loop; once the wrong queue is
    gone, the worker's own comes back."""
    echo = Echo(name=backend.unique("echo"))
    queue = TOPOLOGY.agent_queue(echo.name)
    observer = await backend.connect()
    async with worker_on(await backend.connect(), [echo]) as (worker, _metrics):
        await observer.delete_queue(queue)
        await observer.declare_queue(QueueSpec(name=queue, durable=True))  # no x-max-priority

        async def refused() -> bool:
            reason = worker.not_ready_reason() or ""
            return "already exists" in reason or "different" in reason

        await backend.wait_until(refused, "readiness to name the mismatch")
        assert not worker.is_ready
        assert not worker.consumers_lost  # within the bound: not a liveness failure
        await observer.delete_queue(queue)
        await every_consumer_back(backend, observer, worker.recovery)
        assert worker.is_ready


async def test_a_consumer_that_cannot_heal_fails_liveness_and_ends_serve(
    backend: Backend,
) -> None:
    echo = Echo(name=backend.unique("echo"))
    queue = TOPOLOGY.agent_queue(echo.name)
    observer = await backend.connect()
    worker = Worker(await backend.connect(), [echo], settings=WorkerSettings(reattach_limit_s=0.3))
    serving = asyncio.create_task(worker.serve(shutdown_trigger=asyncio.Event().wait))

    async def ready() -> bool:
        return worker.is_ready

    await backend.wait_until(ready, "the worker serving")
    await observer.delete_queue(queue)
    await observer.declare_queue(QueueSpec(name=queue, durable=True))
    with pytest.raises(BrokerUnavailableError, match=r"not re-attached within 0.3s"):
        await asyncio.wait_for(serving, backend.timeout_s + 1)
    assert worker.consumers_lost is False  # stopped: nothing left to be live for
    await observer.delete_queue(queue)


async def test_a_deleted_group_queue_is_consumed_again(backend: Backend) -> None:
    """Events published after the re-attach are delivered, none twice."""
    group = backend.unique("group")
    event_type = backend.unique("evt")
    seen: list[int] = []
    arrived = asyncio.Event()

    async def handler(payload: dict[str, Any]) -> None:
        seen.append(payload["n"])
        arrived.set()

    observer = await backend.connect()
    async with (
        started(EventBus(await backend.connect())) as bus,
        started(EventBus(observer)) as publisher,
    ):
        await bus.subscribe(event_type, handler, group=group)
        await publisher.publish(event_type, {"n": 0})
        await asyncio.wait_for(arrived.wait(), backend.timeout_s)
        await observer.delete_queue(TOPOLOGY.group_queue(group))
        await every_consumer_back(backend, observer, bus.recovery)
        for n in range(1, 11):
            await publisher.publish(event_type, {"n": n})

        async def all_ten() -> bool:
            return len(seen) >= 11

        await backend.wait_until(all_ten, "the ten events published after the re-attach")
    assert sorted(seen) == list(range(11))
    assert len(seen) == len(set(seen))


async def test_a_deleted_reply_queue_fails_its_calls_then_works_again(backend: Backend) -> None:
    """The call waiting on the lost reply queue ends at once (CONNECTION_LOST); the
    next call goes out with the new queue and succeeds."""
    gate = Gate(name=backend.unique("gate"))
    async with (
        worker_on(await backend.connect(), [gate]),
        RpcClient(await backend.connect()) as client,
    ):
        waiting = asyncio.create_task(client.send(gate.name, "hold", {"n": 1}, timeout_s=30))
        try:
            await asyncio.wait_for(gate.entered.get(), backend.timeout_s)
            old = client.reply_queue
            await backend.operator_deletes_queue(old)
            started = time.monotonic()
            lost = await asyncio.wait_for(waiting, backend.timeout_s)
            ended_after_s = time.monotonic() - started
            gate.release.set()
            first = await client.send(gate.name, "hold", {"n": 2}, timeout_s=5)
            first_took_s = time.monotonic() - started - ended_after_s
        finally:
            gate.release.set()
    assert lost.error is not None
    assert lost.error.code == ErrorCode.CONNECTION_LOST
    assert "reply queue" in lost.error.message
    assert ended_after_s < 1
    assert first.data == {"n": 2}
    assert first_took_s < 1
    assert client.reply_queue != old
