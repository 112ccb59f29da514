"""Cancellation safety on the in-memory broker: deterministic, at every await point.

The promise under test: cancelling the worker or the client at any await point leaves no
message lost, no task leaked and no future unresolved; deliveries not yet started are
requeued; handlers past the grace period are cancelled and their messages requeued.

Every transport operation goes through :class:`Latency`, which suspends once before and
once after the real operation, like a network round trip in which the broker may act
before the caller hears back. Cancelling after ``k`` loop steps therefore lands on a
different await point for each ``k``, the same one on every run, including the "done by
the broker, not yet seen by the caller" points that matter most. Meta-tests check that
the ranges of ``k`` span a whole call, and a whole worker run.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import pytest

from amqp_agents.config import RetryPolicy, WorkerSettings
from amqp_agents.errors import LifecycleError
from amqp_agents.metrics import Metrics
from amqp_agents.models.envelope import Envelope
from amqp_agents.models.messages import AgentResponse
from amqp_agents.models.topology import Topology
from amqp_agents.rpc.client import Request, RpcClient
from amqp_agents.runtime.agent import Agent, action
from amqp_agents.runtime.worker import Worker
from amqp_agents.transport.base import (
    ConsumerEnd,
    ConsumerHandle,
    Delivery,
    DeliveryHandler,
    EndCallback,
    ExchangeKind,
    QueueInfo,
    QueueSpec,
)
from amqp_agents.transport.memory import InMemoryBroker, InMemoryTransport
from tests.agents_for_tests import Journal, Work, data_of
from tests.support import wait_for_tasks_to_end, wait_until

TOPOLOGY = Topology()
POLICY = RetryPolicy(attempts=1, redelivery_delays_s=(0.001,), max_deliveries=50)
"""Requeued requests come back through the 1 ms delay tier; restarts never dead-letter."""
WAIT_S = 2.0
"""Bound of every wait for something that must happen (all of it is in-process)."""


# -- a transport with a round trip per operation -------------------------------------------


class Latency:
    """An :class:`InMemoryTransport` whose every operation suspends before and after.

    Cancelled before the real operation, nothing happened; cancelled after, it happened
    but the caller does not know. Where ``RabbitTransport`` (through aiormq) cleans up
    after a cancelled round trip, so does this: a consumer whose ``basic.consume`` or
    ``basic.cancel`` was cancelled has its channel closed.

    It also records what the tests account with: the publishes the broker took, and the
    deliveries handed to consumers (with their ``redelivered`` flag).
    """

    def __init__(self, inner: InMemoryTransport) -> None:
        self._inner = inner
        self.published: list[Envelope] = []
        """Envelopes the broker accepted, in order."""
        self.delivered: list[tuple[str, Envelope]] = []
        """(queue, envelope) of every delivery handed to a consumer."""

    def __getattr__(self, name: str) -> Any:
        """Anything else the transport offers (such as newer hooks), unchanged."""
        return getattr(self._inner, name)

    @staticmethod
    async def hop() -> None:
        await asyncio.sleep(0)

    @property
    def is_connected(self) -> bool:
        return self._inner.is_connected

    @property
    def is_blocked(self) -> bool:
        return bool(getattr(self._inner, "is_blocked", False))

    def on_connection_lost(
        self, callback: Callable[[BaseException | None], None]
    ) -> Callable[[], None]:
        return self._inner.on_connection_lost(callback)

    async def connect(self) -> None:
        await self.hop()
        await self._inner.connect()
        await self.hop()

    async def aclose(self) -> None:
        await self.hop()
        await self._inner.aclose()
        await self.hop()

    async def declare_exchange(
        self, name: str, kind: ExchangeKind, *, durable: bool = True
    ) -> None:
        await self.hop()
        await self._inner.declare_exchange(name, kind, durable=durable)
        await self.hop()

    async def declare_queue(self, spec: QueueSpec) -> str:
        await self.hop()
        name = await self._inner.declare_queue(spec)
        await self.hop()
        return name

    async def bind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        await self.hop()
        await self._inner.bind_queue(queue, exchange, routing_key)
        await self.hop()

    async def unbind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        await self.hop()
        await self._inner.unbind_queue(queue, exchange, routing_key)
        await self.hop()

    async def queue_info(self, queue: str) -> QueueInfo:
        await self.hop()
        info = await self._inner.queue_info(queue)
        await self.hop()
        return info

    async def publish(
        self,
        envelope: Envelope,
        *,
        mandatory: bool = False,
        confirm: bool = True,
        timeout_s: float,
    ) -> None:
        await self.hop()
        await self._inner.publish(
            envelope, mandatory=mandatory, confirm=confirm, timeout_s=timeout_s
        )
        self.published.append(envelope)
        await self.hop()

    async def consume(
        self,
        queue: str,
        handler: DeliveryHandler,
        *,
        prefetch: int,
        no_ack: bool = False,
        on_end: EndCallback | None = None,
    ) -> ConsumerHandle:
        async def latent(delivery: Delivery) -> None:
            self.delivered.append((queue, delivery.envelope))
            await handler(_LatentDelivery(delivery))

        await self.hop()
        consumer = await self._inner.consume(
            queue, latent, prefetch=prefetch, no_ack=no_ack, on_end=on_end
        )
        try:
            await self.hop()
        except asyncio.CancelledError:
            # As aiormq does when the caller of an RPC (here basic.consume) is cancelled
            # while it waits for the answer: it closes the channel, and the consumer goes.
            await consumer.close()
            raise
        return _LatentConsumer(consumer)

    def requests(self, agent: str) -> list[Envelope]:
        """The requests to ``agent`` this transport published (accepted by the broker)."""
        return [
            e
            for e in self.published
            if e.exchange == TOPOLOGY.requests_exchange and e.routing_key == agent
        ]


class _LatentDelivery:
    def __init__(self, inner: Delivery) -> None:
        self._inner = inner

    @property
    def envelope(self) -> Envelope:
        return self._inner.envelope

    async def ack(self) -> None:
        await Latency.hop()
        await self._inner.ack()
        await Latency.hop()

    async def nack(self, *, requeue: bool = True) -> None:
        await Latency.hop()
        await self._inner.nack(requeue=requeue)
        await Latency.hop()

    async def reject(self) -> None:
        await Latency.hop()
        await self._inner.reject()
        await Latency.hop()


class _LatentConsumer:
    def __init__(self, inner: ConsumerHandle) -> None:
        self._inner = inner

    @property
    def queue(self) -> str:
        return self._inner.queue

    @property
    def ended(self) -> ConsumerEnd | None:
        return self._inner.ended

    async def cancel(self) -> None:
        await Latency.hop()
        await self._inner.cancel()
        try:
            await Latency.hop()
        except asyncio.CancelledError:
            await self._inner.close()  # aiormq closes the channel of a cancelled RPC
            raise

    async def close(self) -> None:
        # Cancelled before it reaches the broker, the channel stays open (on RabbitMQ
        # with Python 3.11: wait_for's inner task is cancelled before it first runs).
        await Latency.hop()
        await self._inner.close()
        await Latency.hop()


# -- agents, steps, leaks ------------------------------------------------------------------


class Stepper(Agent):
    """``work`` takes a few loop steps, then records its id; ``hold`` waits for the gate."""

    name = "stepper"

    def __init__(self, journal: Journal, *, name: str = "stepper", steps: int = 3) -> None:
        super().__init__(name=name)
        self.journal = journal
        self.steps = steps

    async def _run(self, payload: Work, wait: Callable[[], Awaitable[object]]) -> Work:
        journal = self.journal
        journal.started.append(payload.id)
        try:
            await wait()
        except asyncio.CancelledError:
            journal.cancelled.append(payload.id)
            raise
        journal.finished.append(payload.id)
        if journal.on_finish is not None:
            journal.on_finish(payload.id)
        return payload

    @action("work")
    async def work(self, payload: Work) -> Work:
        return await self._run(payload, lambda: steps(self.steps))

    @action("hold")
    async def hold(self, payload: Work) -> Work:
        return await self._run(payload, self.journal.gate.wait)


async def steps(k: int) -> None:
    """Let the event loop run ``k`` steps (every ready callback runs once per step)."""
    for _ in range(k):
        await asyncio.sleep(0)


def running_tasks() -> set[asyncio.Task[Any]]:
    return {task for task in asyncio.all_tasks() if not task.done()}


async def assert_no_task_leaked(baseline: set[asyncio.Task[Any]]) -> None:
    """Every task started since ``baseline`` ends within :data:`WAIT_S`."""
    await wait_for_tasks_to_end(
        lambda: running_tasks() - baseline, timeout_s=WAIT_S, interval_s=0.005
    )


def gauge(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(f"amqp_agents_{name}")
    assert value is not None, name
    return value


# -- the client ----------------------------------------------------------------------------

AGENT = "stepper"
CALL_STEPS = 40
"""Cancellation points tried per kind of call: more than a whole call takes (checked)."""


@dataclass
class ClientRig:
    """A client and the worker it calls, on one broker, with what they did."""

    broker: InMemoryBroker
    journal: Journal
    worker: Worker
    client: RpcClient
    link: Latency
    """The client's transport."""
    metrics: Metrics

    def idle(self) -> bool:
        stats = self.broker.statistics()
        return (
            self.worker.in_flight == 0
            and stats.queues[TOPOLOGY.agent_queue(AGENT)].messages == 0
            and not any(stats.unacked.values())
        )

    async def settle(self) -> None:
        await wait_until(
            self.idle, what="the worker idle and the agent queue drained", timeout_s=WAIT_S
        )

    async def still_works(self) -> None:
        reply = await self.client.send(AGENT, "work", {"id": 10_000}, timeout_s=WAIT_S)
        assert reply.ok, reply
        assert reply.data == {"id": 10_000}
        assert self.client.pending_calls == 0


@pytest.fixture
async def rig() -> AsyncIterator[ClientRig]:
    """A worker serving ``stepper`` and a started client, each on a :class:`Latency` link."""
    broker = InMemoryBroker()
    journal = Journal()
    worker_link = Latency(InMemoryTransport(broker))
    link = Latency(InMemoryTransport(broker))
    await worker_link.connect()
    await link.connect()
    worker = Worker(worker_link, [Stepper(journal)], settings=WorkerSettings(retry=POLICY))
    metrics = Metrics()
    client = RpcClient(link, metrics=metrics)
    await worker.start()
    await client.start()
    try:
        yield ClientRig(broker, journal, worker, client, link, metrics)
    finally:
        journal.gate.set()
        await client.aclose()
        await worker.stop()
        await link.aclose()
        await worker_link.aclose()


@dataclass(frozen=True)
class Kind:
    """One way of calling: how to start it, and which ids its requests carry."""

    name: str
    start: Callable[[RpcClient, int], Coroutine[Any, Any, object]]
    ids: Callable[[int], list[int]]
    replies: bool


KINDS = [
    Kind(
        "send",
        lambda c, k: c.send(AGENT, "work", {"id": k}, timeout_s=WAIT_S),
        lambda k: [k],
        replies=True,
    ),
    Kind(
        "call",
        lambda c, k: c.call(AGENT, "work", {"id": k}, timeout_s=WAIT_S),
        lambda k: [k],
        replies=True,
    ),
    Kind(
        "notify",
        lambda c, k: c.notify(AGENT, "work", {"id": k}, timeout_s=WAIT_S),
        lambda k: [k],
        replies=False,
    ),
    Kind(
        "send_many",
        lambda c, k: c.send_many(
            [Request(AGENT, "work", {"id": 100 * k + i}, timeout_s=WAIT_S) for i in range(3)],
            concurrency=2,
        ),
        lambda k: [100 * k + i for i in range(3)],
        replies=True,
    ),
]


def expected_result(kind: Kind, k: int) -> object:
    """What the call returns when it is not cancelled."""
    data = [{"id": i} for i in kind.ids(k)]
    if kind.name in ("send", "call"):
        return data[0]
    if kind.name == "notify":
        return None
    return data


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.name)
async def test_the_cancellation_points_span_a_whole_call(rig: ClientRig, kind: Kind) -> None:
    """Uncancelled, each kind of call completes in fewer loop steps than are tried."""
    call = asyncio.create_task(kind.start(rig.client, 0))
    taken = 0
    while not call.done():
        await steps(1)
        taken += 1
    assert data_of(call.result()) == expected_result(kind, 0)
    assert 2 < taken < CALL_STEPS, taken


@pytest.mark.parametrize("k", range(CALL_STEPS))
@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.name)
async def test_a_cancelled_call_leaves_nothing_behind(rig: ClientRig, kind: Kind, k: int) -> None:
    """Cancelled after k steps: no pending call, no task, no lost or phantom request.

    Each request the broker accepted is handled exactly once and answered exactly once
    (to the caller or, after the cancellation, dropped as a late reply); one it did not
    accept is never handled. The client then works as before.
    """
    baseline = running_tasks()
    call = asyncio.create_task(kind.start(rig.client, k))
    await steps(k)
    call.cancel()
    await asyncio.wait({call}, timeout=WAIT_S)
    assert call.done(), "the cancelled call did not end"
    if not call.cancelled():
        assert call.exception() is None, call.exception()
        assert data_of(call.result()) == expected_result(kind, k)
    if k == 0:
        assert call.cancelled(), "a call cancelled before it ran completed anyway"

    assert rig.client.pending_calls == 0
    assert gauge(rig.metrics, "rpc_pending_calls") == 0
    await rig.settle()
    await assert_no_task_leaked(baseline)

    accepted = [Work.model_validate_json(e.body).id for e in rig.link.requests(AGENT)]
    assert set(accepted) <= set(kind.ids(k))
    assert sorted(rig.journal.finished) == sorted(accepted), "a request lost or handled twice"
    if not call.cancelled():
        assert sorted(accepted) == kind.ids(k)
    if kind.replies:
        assert rig.worker.stats.replied == len(accepted)
        assert rig.client.late_replies <= len(accepted)
        if not call.cancelled():
            assert rig.client.late_replies == 0
    else:
        assert rig.worker.stats.acked_without_reply == len(accepted)
    await rig.still_works()


def reply_queue_exists(rig: ClientRig) -> bool:
    return rig.client.reply_queue in rig.broker.statistics().queues


@pytest.mark.parametrize("k", range(12))
async def test_aclose_ends_every_call_in_flight(rig: ClientRig, k: int) -> None:
    """aclose() k steps after 4 calls began: each gets its reply or SHUTTING_DOWN, none hangs.

    A call still waiting for its reply when the client closes (``hold`` always is) ends
    ``SHUTTING_DOWN``; calls that had not run yet (k = 0) raise ``LifecycleError``.
    """
    baseline = running_tasks()
    client = rig.client
    calls = [asyncio.create_task(client.send(AGENT, "work", {"id": i})) for i in range(3)]
    calls.append(asyncio.create_task(client.send(AGENT, "hold", {"id": 99})))
    await steps(k)
    await client.aclose()  # in this task: at k = 0 it closes before any call has run
    _done, hanging = await asyncio.wait(calls, timeout=WAIT_S)
    assert not hanging, "a call still waits after aclose()"

    for i, call in enumerate(calls):
        if k == 0:
            assert isinstance(call.exception(), LifecycleError), call
            continue
        reply = call.result()
        assert isinstance(reply, AgentResponse)
        if i == 3 or not reply.ok:
            assert reply.code == "SHUTTING_DOWN", reply
        else:
            assert reply.data == {"id": i}
    assert client.pending_calls == 0
    assert gauge(rig.metrics, "rpc_pending_calls") == 0
    assert not reply_queue_exists(rig), "the reply queue outlived aclose()"

    rig.journal.gate.set()
    await rig.settle()
    await assert_no_task_leaked(baseline)
    await asyncio.wait_for(client.aclose(), WAIT_S)  # again: a no-op
    with pytest.raises(LifecycleError):
        await client.send(AGENT, "work", {"id": 5})


@pytest.mark.parametrize("k", range(8))
async def test_a_cancelled_aclose_can_be_finished(rig: ClientRig, k: int) -> None:
    """aclose() cancelled after k steps, then called again: the client ends fully closed.

    The call in flight ends ``SHUTTING_DOWN``, the reply queue and its consumer are gone,
    and no task is left: whatever the first aclose() did not get to, the second does.
    (k = 1 cancels the close of the reply consumer before it reaches the broker.)
    """
    baseline = running_tasks()
    client = rig.client
    held = asyncio.create_task(client.send(AGENT, "hold", {"id": 1}))
    await wait_until(
        lambda: rig.journal.started == [1], what="the held call in flight", timeout_s=WAIT_S
    )
    closing = asyncio.create_task(client.aclose())
    await steps(k)
    closing.cancel()
    await asyncio.wait({closing}, timeout=WAIT_S)
    await asyncio.wait_for(client.aclose(), WAIT_S)

    reply = await asyncio.wait_for(held, WAIT_S)
    assert reply.code == "SHUTTING_DOWN", reply
    assert client.pending_calls == 0
    assert not reply_queue_exists(rig), "the reply queue (and its consumer) outlived aclose()"
    rig.journal.gate.set()
    await rig.settle()
    await assert_no_task_leaked(baseline)


@pytest.mark.parametrize("k", range(12))
async def test_a_cancelled_start_can_be_closed(k: int) -> None:
    """start() cancelled after k steps, then aclose(): no reply consumer and no task left."""
    broker = InMemoryBroker()
    link = Latency(InMemoryTransport(broker))
    await link.connect()
    baseline = running_tasks()
    client = RpcClient(link)
    starting = asyncio.create_task(client.start())
    await steps(k)
    starting.cancel()
    await asyncio.wait({starting}, timeout=WAIT_S)
    await asyncio.wait_for(client.aclose(), WAIT_S)

    # (A reply queue declared just before the cancellation may stay, empty and unknown
    # to anyone, until the connection closes: only its consumer would be a leak.)
    consumed = {
        name: info.consumers
        for name, info in broker.statistics().queues.items()
        if name.startswith("amq.gen-") and info.consumers
    }
    assert consumed == {}, "a reply consumer outlived aclose()"
    await assert_no_task_leaked(baseline)
    await link.aclose()


# -- the worker ----------------------------------------------------------------------------

AGENTS = ("alpha", "beta")
BACKLOG = 12
"""Queued requests, alternating between the two agents."""
CONCURRENCY = 2
"""Also the prefetch of each queue: of the four deliveries out, two wait for a slot."""


@dataclass
class Backlog:
    """A broker holding :data:`BACKLOG` ``work`` requests, and what their handlers did."""

    broker: InMemoryBroker
    journal: Journal

    def _queues(self) -> dict[str, QueueInfo]:
        return {
            name: info
            for name, info in self.broker.statistics().queues.items()
            if name.startswith(TOPOLOGY.queue_prefix) and not name.endswith(".dead")
        }

    def queued(self) -> int:
        """Requests ready in the agents' work queues and delay tiers."""
        return sum(info.messages for info in self._queues().values())

    def unacked(self) -> int:
        return sum(self.broker.statistics().unacked.values())

    def dead(self) -> int:
        return sum(
            info.messages
            for name, info in self.broker.statistics().queues.items()
            if name.endswith(".dead")
        )

    def done(self) -> bool:
        """Every request handled, nothing queued or unsettled."""
        ids = set(self.journal.finished)
        return ids == set(range(BACKLOG)) and self.queued() == 0 and self.unacked() == 0


def worker_on(
    link: Latency, journal: Journal, *, grace_s: float, metrics: Metrics | None = None
) -> Worker:
    settings = WorkerSettings(concurrency=CONCURRENCY, grace_period_s=grace_s, retry=POLICY)
    agents = [Stepper(journal, name=name) for name in AGENTS]
    return Worker(link, agents, settings=settings, metrics=metrics, depth_interval_s=60)


async def connected(broker: InMemoryBroker) -> Latency:
    link = Latency(InMemoryTransport(broker))
    await link.connect()
    return link


async def backlog() -> Backlog:
    """Declare the agents' queues (a worker starts and stops), then queue the requests."""
    broker = InMemoryBroker()
    journal = Journal()
    link = await connected(broker)
    placeholder = worker_on(link, journal, grace_s=0)
    await placeholder.start()
    await placeholder.stop()
    async with RpcClient(link) as client:
        for i in range(BACKLOG):
            await client.notify(AGENTS[i % len(AGENTS)], "work", {"id": i}, timeout_s=60)
    return Backlog(broker, journal)


async def drain(b: Backlog) -> Latency:
    """A fresh worker handles whatever is left, then stops; returns its link."""
    link = await connected(b.broker)
    stop = asyncio.Event()
    serving = asyncio.create_task(worker_on(link, b.journal, grace_s=5).serve(stop.wait))
    await wait_until(b.done, what="a fresh worker to handle every request left", timeout_s=WAIT_S)
    stop.set()
    await asyncio.wait_for(serving, WAIT_S)
    return link


def redelivered(*links: Latency) -> set[int]:
    """Ids of requests delivered again after a delivery that was not acked."""
    return {
        Work.model_validate_json(envelope.body).id
        for link in links
        for _queue, envelope in link.delivered
        if envelope.redelivered or (envelope.headers or {}).get("x-attempt", 1) != 1
    }


WORKER_STEPS = 72
"""Cancellation points tried for a worker: more than its whole run takes (checked)."""


async def test_the_cancellation_points_span_a_whole_worker_run() -> None:
    """Uncancelled, a worker starts and handles the whole backlog in fewer steps than tried."""
    b = await backlog()
    worker = worker_on(await connected(b.broker), b.journal, grace_s=5, metrics=Metrics())
    serving = asyncio.create_task(worker.serve())
    taken = ready_at = 0
    while not b.done():
        await steps(1)
        taken += 1
        ready_at = ready_at or (taken if worker.is_ready else 0)
    serving.cancel()
    await asyncio.wait({serving}, timeout=WAIT_S)
    assert 10 < ready_at < taken < WORKER_STEPS, (ready_at, taken)


GRACE = {"graceful": 5.0, "no-grace": 0.0}


async def assert_stopped_cleanly(
    b: Backlog,
    worker: Worker,
    serving: asyncio.Task[None],
    baseline: set[asyncio.Task[Any]],
    *,
    grace_s: float,
    serving_already: bool,
) -> None:
    """serve() ended cancelled, leaving nothing running or unsettled and nothing lost."""
    journal = b.journal
    await asyncio.wait({serving}, timeout=WAIT_S)
    assert serving.cancelled(), serving
    assert worker.in_flight == 0
    assert not any(agent.is_running for agent in worker.agents), "an agent was not shut down"
    await assert_no_task_leaked(baseline)
    assert b.unacked() == 0, "a delivery left unsettled (its link is still open)"
    handled = Counter(journal.finished)
    assert all(n == 1 for n in handled.values()), handled
    assert not set(journal.cancelled) & set(handled), "a cancelled handler's request was acked"
    overlap = len(handled) + b.queued() - BACKLOG
    assert overlap >= 0, "a request is neither handled nor queued: lost"
    if grace_s and serving_already:
        # (Cancelled inside consume(), the consumer's channel closes: the deliveries it
        # had already pushed are cancelled and requeued at once, grace or not.)
        assert journal.cancelled == [], "a handler was cancelled within the grace period"
    if grace_s:
        assert overlap == 0, "a request both handled and requeued despite the grace period"
    else:
        assert overlap <= CONCURRENCY


async def assert_drained(b: Backlog, first: Latency, *, grace_s: float) -> None:
    """A fresh worker handles the rest: all handled, none dead, repeats only if redelivered."""
    drained = await drain(b)
    counts = Counter(b.journal.finished)
    assert set(counts) == set(range(BACKLOG))
    assert b.dead() == 0, "a request was dead-lettered because of the restart"
    twice = {i for i, n in counts.items() if n > 1}
    assert twice <= redelivered(first, drained), "handled twice without a redelivery"
    if grace_s:
        assert twice == set()


@pytest.mark.parametrize("grace", GRACE)
@pytest.mark.parametrize("k", range(WORKER_STEPS))
async def test_cancelling_serve_after_k_steps_loses_nothing(k: int, grace: str) -> None:
    """serve() cancelled after k steps (starting, handling, idle) stops as gracefully as stop().

    Right after: no task, no unsettled delivery, agents shut down; every request is either
    handled (and acked) or back in a queue, and with a grace period never both. Then a
    fresh worker handles the rest: every request is handled, none dead-lettered, and one
    handled twice (only possible without grace: a handler cancelled between its return
    and its ack) was redelivered.
    """
    b = await backlog()
    baseline = running_tasks()
    link = await connected(b.broker)
    metrics = Metrics()
    worker = worker_on(link, b.journal, grace_s=GRACE[grace], metrics=metrics)
    serving = asyncio.create_task(worker.serve())
    await steps(k)
    serving_already = worker.is_ready
    serving.cancel()
    await assert_stopped_cleanly(
        b, worker, serving, baseline, grace_s=GRACE[grace], serving_already=serving_already
    )
    assert gauge(metrics, "in_flight") == 0
    await assert_drained(b, link, grace_s=GRACE[grace])
    await assert_no_task_leaked(baseline)


async def in_a_task_group(worker: Worker) -> None:
    """serve() as a child of a task group: cancelling this task cancels it from outside."""
    async with asyncio.TaskGroup() as group:
        group.create_task(worker.serve())


@pytest.mark.parametrize("outer", [False, True], ids=["serve", "task-group"])
@pytest.mark.parametrize("grace", GRACE)
@pytest.mark.parametrize("j", [1, 2, 5, BACKLOG - 1, BACKLOG])
async def test_cancelling_serve_after_j_requests_loses_nothing(
    j: int, grace: str, outer: bool
) -> None:
    """serve(), or a task group running it, cancelled by the j-th handler to finish: the
    same accounting as above."""
    b = await backlog()
    baseline = running_tasks()
    link = await connected(b.broker)
    worker = worker_on(link, b.journal, grace_s=GRACE[grace])
    serving: asyncio.Task[None] = asyncio.create_task(
        in_a_task_group(worker) if outer else worker.serve()
    )

    def cancel_at_j(_id: int) -> None:
        if len(b.journal.finished) == j:
            serving.cancel()

    b.journal.on_finish = cancel_at_j
    await asyncio.wait({serving}, timeout=WAIT_S)
    b.journal.on_finish = None
    assert len(b.journal.finished) >= j
    await assert_stopped_cleanly(
        b, worker, serving, baseline, grace_s=GRACE[grace], serving_already=True
    )
    await assert_drained(b, link, grace_s=GRACE[grace])
    await assert_no_task_leaked(baseline)


async def one_worker(
    broker: InMemoryBroker, journal: Journal, *, grace_s: float, concurrency: int = 2
) -> tuple[Worker, Latency, asyncio.Task[None]]:
    """A worker for both agents, serving (until cancelled) on a link of its own."""
    link = await connected(broker)
    settings = WorkerSettings(concurrency=concurrency, grace_period_s=grace_s, retry=POLICY)
    agents = [Stepper(journal, name=name) for name in AGENTS]
    worker = Worker(link, agents, settings=settings)
    serving = asyncio.create_task(worker.serve())
    await wait_until(lambda: worker.is_ready, what="the worker consuming", timeout_s=WAIT_S)
    return worker, link, serving


def ready(broker: InMemoryBroker, agent: str) -> int:
    return broker.statistics().queues[TOPOLOGY.agent_queue(agent)].messages


async def test_a_handler_past_the_grace_period_is_requeued_and_answered_by_the_next_worker() -> (
    None
):
    """serve() cancelled with grace 0.05 s while a handler runs on: the handler is cancelled,
    nothing is answered, the request is requeued; the next worker answers the waiting
    caller, having handled the request exactly once."""
    broker = InMemoryBroker()
    journal = Journal()
    baseline = running_tasks()
    worker, _link, serving = await one_worker(broker, journal, grace_s=0.05)
    client_link = await connected(broker)
    async with RpcClient(client_link) as client:
        call = asyncio.create_task(client.send("alpha", "hold", {"id": 1}, timeout_s=WAIT_S))
        await wait_until(
            lambda: journal.started == [1], what="the handler running", timeout_s=WAIT_S
        )
        serving.cancel()
        await asyncio.wait({serving}, timeout=WAIT_S)
        assert serving.cancelled()
        assert journal.cancelled == [1]
        assert journal.finished == []
        assert worker.stats.replied == 0
        assert not call.done(), "a cancelled handler's request was answered"
        assert ready(broker, "alpha") == 1
        assert sum(broker.statistics().unacked.values()) == 0

        journal.gate.set()
        successor, next_link, next_serving = await one_worker(broker, journal, grace_s=5)
        reply = await asyncio.wait_for(call, WAIT_S)
        assert reply.ok, reply
        assert reply.data == {"id": 1}
        assert journal.finished == [1]
        assert [e.redelivered for _q, e in next_link.delivered][:1] == [True]
        next_serving.cancel()
        await asyncio.wait({next_serving}, timeout=WAIT_S)
    assert successor.stats.replied == 1
    await assert_no_task_leaked(baseline)


async def queue_two(broker: InMemoryBroker, journal: Journal) -> None:
    """Declare the agents' queues; queue ``hold`` #1 for alpha and ``work`` #2 for beta."""
    link = await connected(broker)
    placeholder = worker_on(link, journal, grace_s=0)
    await placeholder.start()
    await placeholder.stop()
    async with RpcClient(link) as client:
        await client.notify("alpha", "hold", {"id": 1})
        await client.notify("beta", "work", {"id": 2})


async def test_a_waiting_delivery_is_requeued_while_the_stop_still_waits() -> None:
    """Concurrency 1: alpha's request runs, beta's waits for the slot. Cancelled, the worker
    puts beta's request back in its queue at once (another replica can take it), while it
    still waits for alpha's handler to finish within the grace period."""
    broker = InMemoryBroker()
    journal = Journal()
    await queue_two(broker, journal)
    worker, _link, serving = await one_worker(broker, journal, grace_s=5, concurrency=1)
    await wait_until(
        lambda: worker.stats.received == 2, what="both deliveries at the worker", timeout_s=WAIT_S
    )

    serving.cancel()
    await wait_until(
        lambda: ready(broker, "beta") == 1,
        what="beta's request back in its queue",
        timeout_s=WAIT_S,
    )
    assert not serving.done(), "the stop did not wait for the running handler"
    assert journal.started == [1]
    journal.gate.set()
    await asyncio.wait({serving}, timeout=WAIT_S)
    assert serving.cancelled()
    assert journal.finished == [1]
    assert (ready(broker, "alpha"), ready(broker, "beta")) == (0, 1)
    assert sum(broker.statistics().unacked.values()) == 0


async def test_a_delivery_waiting_for_a_slot_is_requeued_even_if_a_slot_frees_during_stop() -> None:
    """Concurrency 1: alpha's request runs, beta's waits for the slot. The stop begins and
    the running handler finishes at once: beta's request must be requeued, not started."""
    broker = InMemoryBroker()
    journal = Journal()
    await queue_two(broker, journal)
    worker, _link, serving = await one_worker(broker, journal, grace_s=5, concurrency=1)
    await wait_until(
        lambda: worker.stats.received == 2, what="both deliveries at the worker", timeout_s=WAIT_S
    )
    assert journal.started == [1]

    serving.cancel()
    journal.gate.set()
    await asyncio.wait({serving}, timeout=WAIT_S)
    assert journal.started == [1], "a delivery waiting for a slot started during the stop"
    assert journal.finished == [1]
    assert ready(broker, "beta") == 1


@pytest.mark.parametrize("k", [1, 2, 4, 8])
async def test_cancelling_serve_again_while_it_stops_leaves_nothing_running(k: int) -> None:
    """serve() cancelled, then cancelled again k steps into its graceful stop (as nested
    timeouts or task groups do), then stop() called to finish: no handler may still run,
    no delivery stay unsettled, no agent stay started."""
    broker = InMemoryBroker()
    journal = Journal()
    baseline = running_tasks()
    worker, _link, serving = await one_worker(broker, journal, grace_s=0.5)
    async with RpcClient(await connected(broker)) as client:
        for i in range(2):
            await client.notify("alpha", "hold", {"id": i})
    await wait_until(
        lambda: len(journal.started) == 2, what="both handlers running", timeout_s=WAIT_S
    )

    serving.cancel()
    await steps(k)
    serving.cancel()
    await asyncio.wait({serving}, timeout=WAIT_S)
    assert serving.cancelled()
    await asyncio.wait_for(worker.stop(), WAIT_S)  # finish what was interrupted

    assert worker.in_flight == 0, "handlers still running after stop()"
    assert not any(agent.is_running for agent in worker.agents), "an agent was not shut down"
    assert sum(broker.statistics().unacked.values()) == 0, "deliveries left unsettled"
    assert ready(broker, "alpha") == 2
    await assert_no_task_leaked(baseline)
