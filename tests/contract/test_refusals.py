"""When the broker says no, the worker never loops, never loses, never hides it.

Each test injects one refusal and asserts exact counts: handler runs, copies in the
dead-letter queue, publishes. The settlement table these follow is in
:mod:`amqp_agents.runtime.settle`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from amqp_agents.config import RetryPolicy, WorkerSettings
from amqp_agents.errors import (
    LifecycleError,
    PublishRejectedError,
    QueueNotFoundError,
    RetryableError,
)
from amqp_agents.events.bus import EventBus
from amqp_agents.metrics import Metrics
from amqp_agents.models.envelope import Envelope
from amqp_agents.models.messages import ErrorCode
from amqp_agents.models.rewrites import attempt_from
from amqp_agents.models.topology import Topology
from amqp_agents.models.wire import encode_request
from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.agent import Agent, action
from amqp_agents.runtime.worker import Worker
from amqp_agents.transport.base import QueueSpec, Transport
from tests.agents_for_tests import Tap
from tests.contract.conftest import PUBLISH_TIMEOUT_S, Backend
from tests.contract.test_layers import Echo, Gate

TOPOLOGY = Topology()


class Counting(Agent):
    """Counts the runs of each action."""

    def __init__(self, *, name: str) -> None:
        super().__init__(name=name)
        self.runs: Counter[str] = Counter()
        self.ran = asyncio.Event()

    @action("ok")
    async def ok(self, payload: dict[str, Any]) -> dict[str, Any]:
        self.runs["ok"] += 1
        self.ran.set()
        return payload

    @action("crash")
    async def crash(self, payload: dict[str, Any]) -> None:
        self.runs["crash"] += 1
        raise RuntimeError("a bug")

    @action("flaky", retry=RetryPolicy(attempts=1, redelivery_delays_s=(0.05,)))
    async def flaky(self, payload: dict[str, Any]) -> dict[str, Any]:
        self.runs["flaky"] += 1
        if self.runs["flaky"] == 1:
            raise RetryableError("not yet")
        return payload


@contextlib.asynccontextmanager
async def worker_on(
    transport: Transport, agents: Sequence[Agent]
) -> AsyncIterator[tuple[Worker, Metrics]]:
    metrics = Metrics()
    worker = Worker(transport, agents, settings=WorkerSettings(), metrics=metrics)
    try:
        await worker.start()
        yield worker, metrics
    finally:
        await worker.stop()


def handled(metrics: Metrics, agent: str, action_name: str, outcome: str) -> float:
    labels = {"agent": agent, "action": action_name, "outcome": outcome}
    return metrics.registry.get_sample_value("amqp_agents_messages_handled_total", labels) or 0


def request(agent: str, action_name: str, *, reply_to: str | None) -> Envelope:
    return encode_request(
        TOPOLOGY,
        agent,
        action_name,
        b"{}",
        message_id=f"{agent}-{action_name}",
        correlation_id=f"{agent}-{action_name}",
        reply_to=reply_to,
        priority=4,
        timeout_s=30,
        max_bytes=1 << 20,
    )


async def test_a_refused_reply_is_dropped_and_the_handler_runs_once(backend: Backend) -> None:
    """The reply goes to a full reject-publish queue: the broker nacks it. The request
    is acked, the reply dropped and counted; nothing loops, nothing is dead-lettered."""
    agent = Counting(name=backend.unique("refused"))
    observer = await backend.connect()
    full = await backend.queue(
        observer, "full", arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
    )
    async with worker_on(await backend.connect(), [agent]) as (_worker, metrics):
        await observer.publish(
            request(agent.name, "ok", reply_to=full), mandatory=True, timeout_s=PUBLISH_TIMEOUT_S
        )

        async def dropped() -> bool:
            return handled(metrics, agent.name, "ok", "reply_dropped") == 1

        await backend.wait_until(dropped, "the reply counted as dropped")
        # A positive control: a normal call still works, and is the only other run.
        async with RpcClient(observer) as client:
            assert (await client.send(agent.name, "ok", {"n": 1}, timeout_s=5)).ok
    assert agent.runs == {"ok": 2}
    assert await backend.ready(observer, TOPOLOGY.agent_queue(agent.name)) == 0
    assert await backend.ready(observer, TOPOLOGY.agent_dead_letter_queue(agent.name)) == 0
    assert await backend.ready(observer, full) == 0


async def test_a_missing_dead_letter_exchange_is_declared_again(backend: Backend) -> None:
    """agents.dlx deleted: the dead-letter copy is refused (404), the worker declares the
    exchange, queue and binding again and sends it once more: one copy, one run."""
    agent = Counting(name=backend.unique("nodlx"))
    observer = await backend.connect()
    async with (
        worker_on(await backend.connect(), [agent]),
        RpcClient(await backend.connect()) as client,
    ):
        await backend.operator_deletes_exchange(TOPOLOGY.requests_dead_letter_exchange)
        reply = await client.send(agent.name, "crash", {}, timeout_s=5)
    assert reply.error is not None
    assert reply.error.code == ErrorCode.INTERNAL_ERROR
    assert agent.runs == {"crash": 1}
    assert await backend.ready(observer, TOPOLOGY.agent_dead_letter_queue(agent.name)) == 1
    assert await backend.ready(observer, TOPOLOGY.agent_queue(agent.name)) == 0


async def test_a_deleted_dead_letter_queue_is_declared_again(backend: Backend) -> None:
    """The dead-letter copy is mandatory: with its queue gone it is not confirmed into
    nowhere; the queue comes back with the copy in it."""
    agent = Counting(name=backend.unique("nodead"))
    dead = TOPOLOGY.agent_dead_letter_queue(agent.name)
    observer = await backend.connect()
    async with (
        worker_on(await backend.connect(), [agent]),
        RpcClient(await backend.connect()) as client,
    ):
        await observer.delete_queue(dead)
        reply = await client.send(agent.name, "crash", {}, timeout_s=5)
    assert reply.error is not None
    assert agent.runs == {"crash": 1}
    assert await backend.ready(observer, dead) == 1


async def test_a_deleted_retry_queue_is_declared_again(backend: Backend) -> None:
    """A retry after the tier was deleted: declared again, the retry comes back and
    the caller gets the second run's answer (before: confirmed into nowhere, lost)."""
    agent = Counting(name=backend.unique("noretry"))
    tier = TOPOLOGY.agent_retry_queue(agent.name, 50)
    observer = await backend.connect()
    async with (
        worker_on(await backend.connect(), [agent]),
        RpcClient(await backend.connect()) as client,
    ):
        # Declared once by a first retry, then deleted behind the worker's back.
        assert (await client.send(agent.name, "flaky", {"n": 1}, timeout_s=5)).ok
        await observer.delete_queue(tier)
        agent.runs["flaky"] = 0
        reply = await client.send(agent.name, "flaky", {"n": 2}, timeout_s=5)
    assert reply.data == {"n": 2}
    assert agent.runs["flaky"] == 2
    assert await backend.ready(observer, tier) == 0


async def test_a_refused_publish_does_not_fail_the_ones_beside_it(backend: Backend) -> None:
    """One publish to a missing exchange among fifty good ones: only it fails (404);
    every good one is confirmed and arrives."""
    transport, observer = await backend.connect(), await backend.connect()
    queue = await observer.declare_queue(QueueSpec(name=backend.unique("q")))
    inbox = await backend.consume(observer, queue, prefetch=100)

    async def good(n: int) -> None:
        await backend.publish(transport, str(n).encode(), routing_key=queue)

    async def bad() -> None:
        await backend.publish(transport, b"bad", exchange=backend.unique("nox"), routing_key="k")

    results = await asyncio.gather(
        *(good(n) for n in range(25)),
        bad(),
        *(good(n) for n in range(25, 50)),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1
    assert isinstance(errors[0], QueueNotFoundError), errors
    received = {int(d.envelope.body) for d in await inbox.take(50)}
    assert received == set(range(50))


async def test_a_full_queue_nacks_clearly(backend: Backend) -> None:
    """The in-memory broker models reject-publish as RabbitMQ does: a nack."""
    transport = await backend.connect()
    full = await backend.queue(
        transport, "full", arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
    )
    await backend.publish(transport, b"1", routing_key=full)
    with pytest.raises(PublishRejectedError):
        await backend.publish(transport, b"2", routing_key=full)
    assert await backend.ready(transport, full) == 1


async def test_requests_a_stop_gives_back_are_not_counted_as_attempts(backend: Backend) -> None:
    """An unstarted request (delivered, waiting for a slot) given back at a stop comes
    back as it went: not redelivered, same attempt. A few rolling restarts no longer
    dead-letter a healthy request as "may crash the worker"."""
    gate, echo = Gate(name=backend.unique("busy")), Echo(name=backend.unique("waiting"))
    queue = TOPOLOGY.agent_queue(echo.name)
    observer = await backend.connect()
    first = Worker(
        await backend.connect(),
        [gate, echo],
        settings=WorkerSettings(concurrency=1, grace_period_s=10),
    )
    await first.start()
    async with RpcClient(observer) as client:
        await client.notify(gate.name, "hold", {"n": 0}, timeout_s=60)
        assert await asyncio.wait_for(gate.entered.get(), backend.timeout_s) == {"n": 0}
        for n in range(1, 3):  # one waits in the worker for the only slot, one queued
            await client.notify(echo.name, "echo", {"n": n}, timeout_s=60)

        async def waiting() -> bool:
            return await backend.ready(observer, queue) == 1

        await backend.wait_until(waiting, "one request in the worker, waiting for the slot")
        stopping = asyncio.create_task(first.stop())

        async def stopped_taking_work() -> bool:
            return (await observer.queue_info(queue)).consumers == 0

        await backend.wait_until(stopped_taking_work, "the stop to cancel the consumers")
        gate.release.set()
        await asyncio.wait_for(stopping, backend.timeout_s)
    assert first.stats.requeued == 1
    assert await backend.ready(observer, queue) == 2
    tap = Tap(await backend.connect())
    second = Worker(tap, [echo])
    await second.start()
    try:

        async def both() -> bool:
            return len(tap.deliveries(queue)) == 2 and await backend.ready(observer, queue) == 0

        await backend.wait_until(both, "both requests handled by the next worker")
    finally:
        await second.stop()
    again = tap.deliveries(queue)
    assert sorted(json.loads(e.body)["n"] for e in again) == [1, 2]
    assert [(e.redelivered, attempt_from(e)) for e in again] == [(False, 1), (False, 1)]


async def test_an_event_that_crashes_its_subscriber_is_dead_lettered(backend: Backend) -> None:
    """An event whose handler takes its consumer down with it (a crash: never settled)
    comes back redelivered; the bus counts that in the message and dead-letters it
    after max_deliveries, instead of looping forever on the group queue."""
    group, event_type = backend.unique("crashy"), backend.unique("boom")
    transport, observer = await backend.connect(), await backend.connect()
    # Prefetch 1: the copy cannot reach the handler (and "crash" the channel) before the
    # original's ack. With more in flight a crash in between can fork a second lineage,
    # which is dead-lettered the same way: bounded either way.
    bus = EventBus(transport, max_deliveries=3, prefetch=1)
    runs = 0

    async def crashing(payload: dict[str, Any]) -> None:
        nonlocal runs
        runs += 1
        (attachment,) = bus.recovery.attachments
        assert attachment.handle is not None
        await backend.close_consumer_channel(transport, attachment.handle)
        await asyncio.Event().wait()  # never settles: cancelled with its channel

    await bus.start()
    publisher = EventBus(observer)
    await publisher.start()
    try:
        await bus.subscribe(event_type, crashing, group=group)
        await publisher.publish(event_type, {"n": 1})
        dead = TOPOLOGY.group_dead_letter_queue(group)

        async def dead_lettered() -> bool:
            return await backend.ready(observer, dead) == 1

        await backend.wait_until(dead_lettered, "the event in the group's dead-letter queue")
    finally:
        await bus.aclose()
        await publisher.aclose()
    assert runs == 3
    assert await backend.ready(observer, TOPOLOGY.group_queue(group)) == 0


class Stubborn(Agent):
    """A handler that swallows the cancellation of its time limit until released."""

    def __init__(self, *, name: str) -> None:
        super().__init__(name=name)
        self.runs = 0
        self.release = asyncio.Event()

    @action("stuck", timeout_s=0.2, retry=RetryPolicy(attempts=1, max_deliveries=1))
    async def stuck(self, payload: dict[str, Any]) -> None:
        self.runs += 1
        while not self.release.is_set():
            with contextlib.suppress(asyncio.CancelledError):  # the bug being tested
                await self.release.wait()


async def test_handlers_that_ignore_cancellation_are_let_go(backend: Backend) -> None:
    """Two stuck handlers at concurrency 2 no longer freeze the worker: after a grace
    their slots are freed and their requests requeued (then dead-lettered: they would
    crash any worker), other calls are served, and liveness names the stuck ones."""
    stubborn, echo = Stubborn(name=backend.unique("stubborn")), Echo(name=backend.unique("e"))
    observer = await backend.connect()
    worker = Worker(
        await backend.connect(), [stubborn, echo], settings=WorkerSettings(concurrency=2)
    )
    await worker.start()
    try:
        async with RpcClient(observer) as client:
            for n in range(2):
                await client.notify(stubborn.name, "stuck", {"n": n}, timeout_s=60)
            reply = await client.send(echo.name, "echo", {"n": 1}, timeout_s=15)
            assert reply.data == {"n": 1}
            failure = worker.liveness_failure()
            assert failure is not None
            assert f"{stubborn.name}.stuck" in failure
            dead = TOPOLOGY.agent_dead_letter_queue(stubborn.name)

            async def both_dead() -> bool:
                return await backend.ready(observer, dead) == 2

            await backend.wait_until(both_dead, "both stuck requests dead-lettered")
    finally:
        stubborn.release.set()
        await worker.stop()
    assert stubborn.runs == 2
    assert worker.liveness_failure() is None  # released: nothing stuck any more


async def test_refusals_under_steady_load_leave_the_other_traffic_alone(backend: Backend) -> None:
    """Findings 1-4 injected one after the other while four callers keep calling an agent
    on the same worker and the same client transport: every one of their calls is
    answered (0 errors, 0 hung), and each refusal ends exactly as the table says."""
    counting, echo = Counting(name=backend.unique("hurt")), Echo(name=backend.unique("load"))
    observer = await backend.connect()
    client_transport = await backend.connect()
    full = await backend.queue(
        observer, "full", arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
    )
    async with (
        worker_on(await backend.connect(), [counting, echo]) as (_worker, metrics),
        RpcClient(client_transport) as client,
    ):
        stop = asyncio.Event()
        replies: list[Any] = []

        async def caller(k: int) -> None:
            n = 0
            while not stop.is_set():
                replies.append(await client.send(echo.name, "echo", {"k": k, "n": n}, timeout_s=5))
                n += 1

        callers = [asyncio.create_task(caller(k)) for k in range(4)]
        try:
            # 1. a reply the broker refuses
            await observer.publish(
                request(counting.name, "ok", reply_to=full),
                mandatory=True,
                timeout_s=PUBLISH_TIMEOUT_S,
            )
            # 2-3. the dead-letter exchange and a retry tier deleted, then used
            await backend.operator_deletes_exchange(TOPOLOGY.requests_dead_letter_exchange)
            crashed = await client.send(counting.name, "crash", {}, timeout_s=5)
            flaky = await client.send(counting.name, "flaky", {"n": 1}, timeout_s=5)
            # 4. a publish to a missing exchange on the callers' own transport
            try:
                await backend.publish(
                    client_transport, b"x", exchange=backend.unique("nox"), routing_key="k"
                )
            except QueueNotFoundError:
                refused = True
            else:
                refused = False

            async def dropped() -> bool:
                return handled(metrics, counting.name, "ok", "reply_dropped") == 1

            await backend.wait_until(dropped, "the refused reply counted")
            before = len(replies)

            async def more() -> bool:  # the load goes on after the last refusal
                return len(replies) >= before + 20

            await backend.wait_until(more, "twenty more calls answered after the refusals")
        finally:
            stop.set()
            done, pending = await asyncio.wait(callers, timeout=10)
    assert not pending, "a caller hung"
    assert all(task.exception() is None for task in done)
    assert [r.error for r in replies if not r.ok] == []
    assert refused
    assert crashed.error is not None
    assert crashed.error.code == ErrorCode.INTERNAL_ERROR
    assert flaky.data == {"n": 1}
    assert counting.runs == {"ok": 1, "crash": 1, "flaky": 2}
    assert await backend.ready(observer, TOPOLOGY.agent_dead_letter_queue(counting.name)) == 1


class Hanging(Agent):
    """An agent whose start() hangs (a dependency that never answers)."""

    start_timeout_s = 0.2

    async def start(self) -> None:
        await asyncio.Event().wait()

    @action("noop")
    async def noop(self) -> None:
        return None


async def test_a_start_hook_that_hangs_fails_the_start_within_its_bound(backend: Backend) -> None:
    worker = Worker(await backend.connect(), [Hanging(name=backend.unique("hang"))])
    with pytest.raises(LifecycleError, match=r"did not start within 0\.2s"):
        await asyncio.wait_for(worker.start(), backend.timeout_s)


class StubbornListener(Agent):
    """An agent whose worker also runs a stuck event handler (subscribed by the test)."""

    def __init__(self, *, name: str) -> None:
        super().__init__(name=name)
        self.release = asyncio.Event()
        self.runs = 0

    @action("ping")
    async def ping(self) -> str:
        return "pong"


async def test_event_handlers_that_ignore_cancellation_are_let_go(backend: Backend) -> None:
    """The watchdog covers event handlers too: at concurrency 1 a stuck one no longer
    freezes the worker, and liveness names it."""
    event_type = backend.unique("stuck")
    listener = StubbornListener(name=backend.unique("listener"))

    async def stubborn(payload: dict[str, Any]) -> None:
        listener.runs += 1
        while not listener.release.is_set():
            with contextlib.suppress(asyncio.CancelledError):  # the bug being tested
                await listener.release.wait()

    worker = Worker(
        await backend.connect(),
        [listener],
        settings=WorkerSettings(concurrency=1, action_timeout_s=0.2),
    )
    await worker.start()
    publisher = EventBus(await backend.connect())
    await publisher.start()
    try:
        await worker.events.subscribe(event_type, stubborn, group=backend.unique("g"))
        await publisher.publish(event_type, {"n": 1})
        async with RpcClient(await backend.connect()) as client:
            reply = await client.send(listener.name, "ping", {}, timeout_s=15)
        assert reply.data == "pong"
        failure = worker.liveness_failure()
        assert failure is not None
        assert f"event handler for {event_type}" in failure
    finally:
        listener.release.set()
        await publisher.aclose()
        await worker.stop()
    assert listener.runs >= 1
