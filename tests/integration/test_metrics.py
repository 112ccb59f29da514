"""Metrics on the real broker: queue depth, exact counter moves, retries, bounded labels.

Every worker, client and bus gets its own :class:`Metrics` (an explicit registry), so a
test reads exactly what its own objects counted. Gauges that a background probe sets
(queue depth, consumers) are polled with a bounded loop, never waited for with a sleep.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

from amqp_agents.config import RetryPolicy, WorkerSettings
from amqp_agents.errors import AgentError, BrokerUnavailableError, NotFoundError
from amqp_agents.events.bus import EventBus
from amqp_agents.metrics import Metrics
from amqp_agents.models.topology import Topology
from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.agent import Agent, action, on_event
from amqp_agents.runtime.monitor import QueueMonitor
from amqp_agents.runtime.worker import Worker
from amqp_agents.transport.base import QueueInfo, Transport
from amqp_agents.transport.rabbitmq import RabbitTransport
from tests.agents_for_tests import Flaky
from tests.support import wait_until

Connect = Callable[..., Awaitable[RabbitTransport]]
Unique = Callable[[str], str]
Labels = tuple[tuple[str, str], ...]

TOPOLOGY = Topology()
DEPTH = "amqp_agents_queue_depth"
CONSUMERS = "amqp_agents_queue_consumers"
DEPTH_ERRORS = "amqp_agents_queue_depth_errors_total"
RECEIVED = "amqp_agents_messages_received_total"
HANDLED = "amqp_agents_messages_handled_total"
HANDLER_COUNT = "amqp_agents_handler_duration_seconds_count"
HANDLER_SUM = "amqp_agents_handler_duration_seconds_sum"
HANDLER_TIMEOUTS = "amqp_agents_handler_timeouts_total"
ERROR_REPLIES = "amqp_agents_error_replies_total"
RETRIES = "amqp_agents_retries_total"
DEAD_LETTERS = "amqp_agents_dead_letters_total"
IN_FLIGHT = "amqp_agents_in_flight"
CONCURRENCY = "amqp_agents_concurrency_limit"
PUBLISHED = "amqp_agents_events_published_total"
CONSUMED = "amqp_agents_events_consumed_total"
RPC_CALLS = "amqp_agents_rpc_calls_total"
RPC_COUNT = "amqp_agents_rpc_duration_seconds_count"
RPC_SUM = "amqp_agents_rpc_duration_seconds_sum"
RPC_PENDING = "amqp_agents_rpc_pending_calls"
DEPTH_INTERVAL_S = 0.1


# -- test agents ---------------------------------------------------------------------


class Teapot(AgentError):
    """An application error with a code of its own (not one of the standard codes)."""

    code = "I_AM_A_TEAPOT"


class Probe(Agent):
    """One action per outcome the metrics tell apart; ``gate`` holds until ``opened``."""

    def __init__(self, *, name: str) -> None:
        super().__init__(name=name)
        self.opened = asyncio.Event()
        self.entered = 0

    @action("ok")
    async def ok(self, payload: dict[str, Any]) -> dict[str, Any]:
        return payload

    @action("missing")
    async def missing(self) -> None:
        raise NotFoundError("no such thing")

    @action("slow", timeout_s=0.2)
    async def slow(self) -> None:
        await asyncio.Event().wait()  # never set: the action's timeout ends it

    @action("gate")
    async def gate(self) -> None:
        self.entered += 1
        async with asyncio.timeout(20):
            await self.opened.wait()

    @action("teapot")
    async def teapot(self) -> None:
        raise Teapot("short and stout")


class Listener(Agent):
    """Handles ``metrics.fine`` events; ``metrics.broken`` ones make it raise."""

    def __init__(self, *, name: str) -> None:
        super().__init__(name=name)
        self.got: list[dict[str, Any]] = []

    @on_event("metrics.fine")
    async def fine(self, payload: dict[str, Any]) -> None:
        self.got.append(payload)

    @on_event("metrics.broken")
    async def broken(self) -> None:
        raise RuntimeError("a bug in the event handler")


# -- helpers -------------------------------------------------------------------------


def series(metrics: Metrics, sample: str, **match: str) -> dict[Labels, float]:
    """Every sample named ``sample`` whose labels include ``match``, by its other labels."""
    found: dict[Labels, float] = {}
    for family in metrics.registry.collect():
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in match.items()):
                rest = tuple(sorted((k, v) for k, v in s.labels.items() if k not in match))
                found[rest] = s.value
    return found


def value(metrics: Metrics, sample: str, **labels: str) -> float | None:
    """One sample's value; ``None`` if that series was never touched."""
    return metrics.registry.get_sample_value(sample, labels)


async def settles(
    metrics: Metrics, sample: str, expected: float, *, timeout_s: float = 10.0, **labels: str
) -> None:
    """Poll until the sample equals ``expected`` (bounded); fail with the last value seen."""
    await wait_until(
        lambda: value(metrics, sample, **labels) == expected,
        timeout_s=timeout_s,
        interval_s=0.02,
        what=lambda: (
            f"{sample}{labels} to be {expected} (it is {value(metrics, sample, **labels)})"
        ),
    )


async def declare_only(transport: RabbitTransport, agent: Agent) -> None:
    """Declare and bind the agent's queues, then stop consuming: requests pile up."""
    worker = Worker(transport, [agent])
    await worker.start()
    await worker.stop()


@asynccontextmanager
async def serving(
    connect: Connect,
    agents: list[Agent],
    *,
    settings: WorkerSettings | None = None,
) -> AsyncIterator[tuple[Worker, Metrics, RpcClient, Metrics]]:
    """A worker and an RPC client, each with metrics of its own; stopped after."""
    worker_metrics, client_metrics = Metrics(), Metrics()
    worker = Worker(
        await connect(),
        agents,
        settings=settings,
        metrics=worker_metrics,
        depth_interval_s=DEPTH_INTERVAL_S,
    )
    client = RpcClient(await connect(), metrics=client_metrics)
    await client.start()
    try:
        await worker.start()
        yield worker, worker_metrics, client, client_metrics
    finally:
        await worker.stop()
        await client.aclose()


# -- queue depth ---------------------------------------------------------------------


async def test_queue_depth_and_consumers_follow_the_backlog(
    connect: Connect, unique: Unique
) -> None:
    """Depth rises to N with no consumer, N-1 with one blocked, 0 once drained; consumers 1->0."""
    name, requests = unique("depth"), 5
    queue, absent = TOPOLOGY.agent_queue(name), unique("agents.absent")
    observer = await connect()
    await declare_only(await connect(), Probe(name=name))
    seen = Metrics()
    # The missing queue comes first: its failed probe must not stop the next one.
    monitor = QueueMonitor(observer, seen, lambda: [absent, queue], interval_s=DEPTH_INTERVAL_S)
    monitor.start()
    try:
        await settles(seen, DEPTH, 0, queue=queue)
        assert value(seen, CONSUMERS, queue=queue) == 0
        async with RpcClient(observer) as client:
            for _ in range(requests):
                await client.notify(name, "gate", timeout_s=60)
        await settles(seen, DEPTH, requests, queue=queue)
        errors_at_backlog = value(seen, DEPTH_ERRORS, queue=absent)
        assert errors_at_backlog is not None
        assert errors_at_backlog >= 1

        agent = Probe(name=name)
        worker_metrics = Metrics()
        worker = Worker(
            await connect(),
            [agent],
            settings=WorkerSettings(concurrency=1),
            metrics=worker_metrics,
            depth_interval_s=DEPTH_INTERVAL_S,
        )
        await worker.start()
        try:
            assert worker.is_ready
            assert not worker.consumers_lost
            await wait_until(lambda: agent.entered == 1, timeout_s=10, what="one request in flight")
            # Prefetch 1: one delivery is unacked (not "ready"), the rest wait.
            for metrics in (seen, worker_metrics):
                await settles(metrics, DEPTH, requests - 1, queue=queue)
                await settles(metrics, CONSUMERS, 1, queue=queue)
            await settles(worker_metrics, DEPTH, 0, queue=TOPOLOGY.agent_dead_letter_queue(name))
            assert value(worker_metrics, IN_FLIGHT) == 1
            assert value(worker_metrics, CONCURRENCY) == 1

            agent.opened.set()
            await settles(
                worker_metrics, HANDLED, requests, agent=name, action="gate", outcome="ok"
            )
            for metrics in (seen, worker_metrics):
                await settles(metrics, DEPTH, 0, queue=queue)
            assert value(worker_metrics, CONSUMERS, queue=queue) == 1
            assert value(worker_metrics, IN_FLIGHT) == 0
            assert value(worker_metrics, RECEIVED, agent=name) == requests
        finally:
            await worker.stop()
        await settles(seen, CONSUMERS, 0, queue=queue)
        assert value(seen, DEPTH, queue=queue) == 0

        # The missing queue failed every probe and reads as empty with no consumer (not
        # a stale value: QueueWithoutConsumers can fire); the others kept going.
        errors_now = value(seen, DEPTH_ERRORS, queue=absent)
        assert errors_now is not None
        assert errors_now > errors_at_backlog
        assert value(seen, DEPTH, queue=absent) == 0
        assert value(seen, CONSUMERS, queue=absent) == 0
        assert value(seen, DEPTH_ERRORS, queue=queue) is None
    finally:
        await monitor.aclose()


async def test_one_probe_counts_a_missing_queue_and_sets_the_rest(
    connect: Connect, unique: Unique
) -> None:
    """QueueMonitor.probe(): a missing queue adds one error and reads 0 messages and 0
    consumers; the queues after it are set."""
    name = unique("probe")
    queue, dead, absent = (
        TOPOLOGY.agent_queue(name),
        TOPOLOGY.agent_dead_letter_queue(name),
        unique("agents.absent"),
    )
    observer = await connect()
    await declare_only(await connect(), Probe(name=name))
    async with RpcClient(observer) as client:
        for _ in range(3):
            await client.notify(name, "ok", {}, timeout_s=60)
    seen = Metrics()
    monitor = QueueMonitor(observer, seen, lambda: [queue, absent, dead])
    await monitor.probe()
    gone = (("queue", absent),)
    assert series(seen, DEPTH) == {(("queue", queue),): 3, (("queue", dead),): 0, gone: 0}
    assert series(seen, CONSUMERS) == {(("queue", queue),): 0, (("queue", dead),): 0, gone: 0}
    assert series(seen, DEPTH_ERRORS) == {gone: 1}
    await monitor.probe()
    assert series(seen, DEPTH_ERRORS) == {(("queue", absent),): 2}
    assert observer.is_connected, "a failed passive declare must not take the link down"
    assert (await observer.queue_info(queue)).messages == 3


class LinkDiesMidProbe:
    """A transport whose first depth probe is cut off by a dying link, as aiormq does it.

    aiormq runs each RPC in a task of its own; when the connection dies it throws the
    connection's error into that task (``TaskWrapper.throw``), so a caller cancelled
    while awaiting it gets that error instead of ``CancelledError``. Later probes fail
    at once, like every operation on a lost connection.
    """

    def __init__(self) -> None:
        self.probes = 0
        self.in_flight = asyncio.Event()
        self._lost = False

    async def queue_info(self, queue: str) -> QueueInfo:
        self.probes += 1
        if self._lost:
            raise BrokerUnavailableError("the broker connection is lost")
        return await asyncio.ensure_future(self._rpc())

    async def _rpc(self) -> QueueInfo:
        self.in_flight.set()
        try:
            await asyncio.Event().wait()  # the reply that never comes
        except asyncio.CancelledError:
            self._lost = True
            raise BrokerUnavailableError("connection closed while probing") from None
        raise AssertionError("unreachable")


async def test_monitor_stops_even_if_the_link_dies_mid_probe() -> None:
    """aclose() ends the loop although the probe in flight turns the cancel into an error."""
    transport = LinkDiesMidProbe()
    monitor = QueueMonitor(
        cast("Transport", transport), Metrics(), lambda: ["agents.x"], interval_s=0.01
    )
    monitor.start()
    await asyncio.wait_for(transport.in_flight.wait(), timeout=5)
    closing = asyncio.create_task(monitor.aclose())
    done, _ = await asyncio.wait({closing}, timeout=8)
    # On failure the fixture _no_leftover_tasks cancels the loop (at a sleep, it obeys).
    assert done, f"aclose() still waiting after 8 s; the loop has probed {transport.probes} times"
    probes = transport.probes
    await asyncio.sleep(0.1)  # a window in which a live loop would probe ~10 times
    assert transport.probes == probes, "the monitor kept probing after aclose()"


# -- counters and histograms ---------------------------------------------------------


async def test_rpc_counters_and_histograms_move_by_exactly_the_calls_made(
    connect: Connect, unique: Unique
) -> None:
    """3 ok, 2 NOT_FOUND, 1 handler timeout, 1 NO_ROUTE, 1 client timeout: exact counts."""
    name, idle, nobody = unique("counted"), unique("idle"), unique("nobody")
    await declare_only(await connect(), Probe(name=idle))  # queued, never answered
    async with serving(connect, [Probe(name=name)]) as (_worker, wm, client, cm):
        for i in range(3):
            assert (await client.send(name, "ok", {"i": i}, timeout_s=10)).ok
        for _ in range(2):
            assert (await client.send(name, "missing", timeout_s=10)).code == "NOT_FOUND"
        assert (await client.send(name, "slow", timeout_s=10)).code == "TIMEOUT"
        assert (await client.send(nobody, "ok", timeout_s=10)).code == "NO_ROUTE"
        waiting = asyncio.create_task(client.send(idle, "ok", timeout_s=1.0))
        await settles(cm, RPC_PENDING, 1)
        assert (await waiting).code == "TIMEOUT"
        # The worker counts after its ack, which may trail the reply by a moment.
        await settles(wm, HANDLED, 2, agent=name, action="missing", outcome="error")
        await settles(wm, HANDLED, 1, agent=name, action="slow", outcome="error")
        await settles(wm, HANDLED, 3, agent=name, action="ok", outcome="ok")

        assert series(wm, HANDLED, agent=name) == {
            (("action", "ok"), ("outcome", "ok")): 3,
            (("action", "missing"), ("outcome", "error")): 2,
            (("action", "slow"), ("outcome", "error")): 1,
        }
        assert series(wm, ERROR_REPLIES, agent=name) == {
            (("action", "missing"), ("code", "NOT_FOUND")): 2,
            (("action", "slow"), ("code", "TIMEOUT")): 1,
        }
        assert series(wm, HANDLER_TIMEOUTS) == {(("action", "slow"), ("agent", name)): 1}
        assert series(wm, HANDLER_COUNT, agent=name) == {
            (("action", "ok"),): 3,
            (("action", "missing"),): 2,
            (("action", "slow"),): 1,
        }
        handler_sum = value(wm, HANDLER_SUM, agent=name, action="slow")
        assert handler_sum is not None
        assert handler_sum >= 0.2
        assert value(wm, RECEIVED, agent=name) == 6
        assert series(wm, RETRIES) == {}
        assert series(wm, DEAD_LETTERS) == {}
        assert value(wm, IN_FLIGHT) == 0
        assert series(wm, RPC_CALLS) == {}, "the worker made no calls"

        assert series(cm, RPC_CALLS) == {
            (("action", "ok"), ("agent", name), ("outcome", "ok")): 3,
            (("action", "missing"), ("agent", name), ("outcome", "NOT_FOUND")): 2,
            (("action", "slow"), ("agent", name), ("outcome", "TIMEOUT")): 1,
            # NO_ROUTE: the agent name is unknown to the broker, so it is no new series.
            (("action", "other"), ("agent", "other"), ("outcome", "NO_ROUTE")): 1,
            (("action", "ok"), ("agent", idle), ("outcome", "TIMEOUT")): 1,
        }
        assert series(cm, RPC_COUNT) == {
            (("action", "ok"), ("agent", name)): 3,
            (("action", "missing"), ("agent", name)): 2,
            (("action", "slow"), ("agent", name)): 1,
            (("action", "other"), ("agent", "other")): 1,
            (("action", "ok"), ("agent", idle)): 1,
        }
        rpc_sum = value(cm, RPC_SUM, agent=idle, action="ok")
        assert rpc_sum is not None
        assert rpc_sum >= 1.0
        assert value(cm, RPC_PENDING) == 0
        assert series(cm, HANDLED) == {}, "the client handled nothing"


async def test_event_counters(connect: Connect, unique: Unique) -> None:
    """events_published counts confirmed publishes; events_consumed counts by group and outcome."""
    listener = Listener(name=unique("listener"))
    group = listener.name  # @on_event handlers join the group named after their agent
    published = Metrics()
    async with serving(connect, [listener]) as (_worker, wm, _client, _cm):
        bus = EventBus(await connect(), metrics=published)
        await bus.start()
        try:
            await bus.publish("metrics.fine", {"n": 1})
            await bus.publish("metrics.fine", {"n": 2})
            await bus.publish("metrics.broken", {"n": 3})
        finally:
            await bus.aclose()
        assert value(published, PUBLISHED) == 3
        await settles(wm, CONSUMED, 2, group=group, outcome="ok")
        await settles(wm, CONSUMED, 1, group=group, outcome="dead_lettered")
        assert series(wm, CONSUMED) == {
            (("group", group), ("outcome", "ok")): 2,
            (("group", group), ("outcome", "dead_lettered")): 1,
        }
        assert listener.got == [{"n": 1}, {"n": 2}]
        assert value(wm, PUBLISHED) == 0, "the worker published nothing"
        # The worker's monitor watches the group's queues too.
        await settles(wm, DEPTH, 1, queue=TOPOLOGY.group_dead_letter_queue(group))
        await settles(wm, DEPTH, 0, queue=TOPOLOGY.group_queue(group))


# -- retries and dead letters --------------------------------------------------------


async def test_retries_and_dead_letters_are_counted(connect: Connect, unique: Unique) -> None:
    """RetryableError with max_deliveries=2: retries_total 1, dead_letters{UNAVAILABLE} 1."""
    agent = Flaky(name=unique("retried"))
    policy = RetryPolicy(attempts=1, redelivery_delays_s=(0.1,), max_deliveries=2)
    settings = WorkerSettings(retry=policy, action_timeout_s=10)
    async with serving(connect, [agent], settings=settings) as (_worker, wm, client, cm):
        reply = await client.send(agent.name, "poison", {"id": 1}, timeout_s=10)
        assert reply.code == "UNAVAILABLE", reply
        assert agent.calls["poison"] == 2
        await settles(wm, HANDLED, 1, agent=agent.name, action="poison", outcome="error")

        assert series(wm, RETRIES) == {(("action", "poison"), ("agent", agent.name)): 1}
        assert series(wm, DEAD_LETTERS) == {(("agent", agent.name), ("code", "UNAVAILABLE")): 1}
        assert series(wm, HANDLED, agent=agent.name) == {
            (("action", "poison"), ("outcome", "retried")): 1,
            (("action", "poison"), ("outcome", "error")): 1,
        }
        assert series(wm, ERROR_REPLIES, agent=agent.name) == {
            (("action", "poison"), ("code", "UNAVAILABLE")): 1
        }
        assert value(wm, HANDLER_COUNT, agent=agent.name, action="poison") == 2
        assert value(wm, RECEIVED, agent=agent.name) == 2
        assert series(cm, RPC_CALLS) == {
            (("action", "poison"), ("agent", agent.name), ("outcome", "UNAVAILABLE")): 1
        }
        # The delay tier joins the monitored queues once used; the dead letter shows.
        dead = TOPOLOGY.agent_dead_letter_queue(agent.name)
        await settles(wm, DEPTH, 1, queue=dead)
        await settles(wm, DEPTH, 0, queue=TOPOLOGY.agent_retry_queue(agent.name, 100))


# -- bounded labels ------------------------------------------------------------------


async def test_unknown_actions_and_codes_get_bounded_worker_labels(
    connect: Connect, unique: Unique
) -> None:
    """An undeclared action is counted as action="other", a non-standard code as "OTHER"."""
    name, stray = unique("bounded"), f"stray{uuid.uuid4().hex}"
    async with serving(connect, [Probe(name=name)]) as (_worker, wm, client, cm):
        assert (await client.send(name, stray, timeout_s=10)).code == "UNKNOWN_ACTION"
        assert (await client.send(name, "teapot", timeout_s=10)).code == "I_AM_A_TEAPOT"
        await settles(wm, HANDLED, 1, agent=name, action="teapot", outcome="error")
        await settles(wm, HANDLED, 1, agent=name, action="other", outcome="error")

        assert series(wm, ERROR_REPLIES, agent=name) == {
            (("action", "other"), ("code", "UNKNOWN_ACTION")): 1,
            (("action", "teapot"), ("code", "OTHER")): 1,
        }
        assert value(wm, HANDLER_COUNT, agent=name, action="other") == 1
        worker_page = wm.exposition().decode()
        assert stray not in worker_page
        assert "I_AM_A_TEAPOT" not in worker_page
        assert value(cm, RPC_CALLS, agent=name, action="teapot", outcome="OTHER") == 1
        assert "I_AM_A_TEAPOT" not in cm.exposition().decode()


async def test_unknown_actions_get_a_bounded_client_label(connect: Connect, unique: Unique) -> None:
    """The client counts a call the agent answers UNKNOWN_ACTION under action="other"."""
    name, stray = unique("bounded"), f"stray{uuid.uuid4().hex}"
    async with serving(connect, [Probe(name=name)]) as (_worker, _wm, client, cm):
        assert (await client.send(name, stray, timeout_s=10)).code == "UNKNOWN_ACTION"
        assert series(cm, RPC_CALLS) == {
            (("action", "other"), ("agent", name), ("outcome", "UNKNOWN_ACTION")): 1
        }
        assert stray not in cm.exposition().decode()
