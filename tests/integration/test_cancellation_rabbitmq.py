"""Cancellation safety on RabbitMQ: representative cases of tests/unit/test_cancellation.py.

The unit tests place cancellations at every await point, deterministically, on the
in-memory broker. Here the real broker and aiormq decide what is in flight when the
cancellation lands, so each test sweeps a range of delays (from "before the task ran"
to "after the reply came") and checks the same accounting at each: no message lost or
handled twice, no call left pending, no task left running, the link still usable.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

import pytest

from amqp_agents.config import RetryPolicy, WorkerSettings
from amqp_agents.errors import QueueNotFoundError, TransportError
from amqp_agents.models.envelope import Envelope
from amqp_agents.models.topology import Topology
from amqp_agents.rpc.client import Request, RpcClient
from amqp_agents.runtime.agent import Agent, action
from amqp_agents.runtime.worker import Worker
from amqp_agents.transport.base import Delivery, ExchangeKind, QueueSpec, Transport
from amqp_agents.transport.rabbitmq import RabbitTransport
from tests.agents_for_tests import Journal, Tap, Work, data_of
from tests.support import wait_for_tasks_to_end, wait_until

Connect = Callable[..., Awaitable[RabbitTransport]]
TOPOLOGY = Topology()
POLICY = RetryPolicy(attempts=1, redelivery_delays_s=(0.001,), max_deliveries=50)
"""Requeued requests come back through a 1 ms delay tier; restarts never dead-letter."""
WAIT_S = 10.0
DELAYS = [None, 0.0, *(n * 0.0001 for n in range(1, 31)), 0.004, 0.006, 0.008, 0.012, 0.025, 0.05]
"""When to cancel: before the task ran (None), after one loop step (0), every 0.1 ms up
to 3 ms (a call to a local broker takes about 1 ms), then sparser up to 50 ms, by which
time every call has long been answered, even on a loaded machine."""


class Paced(Agent):
    """``work`` takes ``delay_s`` then records its id; ``hold`` waits for the gate first."""

    name = "paced"

    def __init__(self, journal: Journal, *, name: str, delay_s: float = 0.0) -> None:
        super().__init__(name=name)
        self.journal = journal
        self.delay_s = delay_s

    async def _run(self, payload: Work, wait: Awaitable[object]) -> Work:
        self.journal.started.append(payload.id)
        await wait
        self.journal.finished.append(payload.id)
        if self.journal.on_finish is not None:
            self.journal.on_finish(payload.id)
        return payload

    @action("work")
    async def work(self, payload: Work) -> Work:
        return await self._run(payload, asyncio.sleep(self.delay_s))

    @action("hold")
    async def hold(self, payload: Work) -> Work:
        return await self._run(payload, self.journal.gate.wait())


def running_tasks() -> set[asyncio.Task[Any]]:
    """Running tasks, but for aiormq's and aio-pika's connection and channel machinery
    (readers, writers, heartbeats: the transport's, living as long as its channels)."""
    return {
        task
        for task in asyncio.all_tasks()
        if not task.done() and not _LINK_MACHINERY.search(_source(task))
    }


_LINK_MACHINERY = re.compile(r"[/\\](aiormq|aio_pika)[/\\]")


def _source(task: asyncio.Task[Any]) -> str:
    code = getattr(task.get_coro(), "cr_code", None)
    return "" if code is None else str(code.co_filename)


async def assert_no_task_leaked(baseline: set[asyncio.Task[Any]]) -> None:
    """Every task started since ``baseline`` ends within :data:`WAIT_S`."""
    await wait_for_tasks_to_end(
        lambda: running_tasks() - baseline, timeout_s=WAIT_S, interval_s=0.01
    )


async def cancel_after(task: asyncio.Task[Any], delay: float | None) -> None:
    """Cancel ``task`` after ``delay`` seconds (None: before it ran), and let it end."""
    if delay is not None:
        await asyncio.sleep(delay)
    task.cancel()
    await asyncio.wait({task}, timeout=WAIT_S)
    assert task.done(), f"a call cancelled after {delay}s did not end"


async def serving(connect: Connect, journal: Journal, agent: str, **settings: Any) -> Worker:
    """A started worker for ``agent`` (concurrency 1: requests are handled in queue order)."""
    options: dict[str, Any] = {"concurrency": 1, "retry": POLICY, **settings}
    worker = Worker(
        await connect(), [Paced(journal, name=agent)], settings=WorkerSettings(**options)
    )
    await worker.start()
    return worker


# -- the client ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """One way of calling: how to start it, and which ids its requests carry."""

    name: str
    start: Callable[[RpcClient, str, int], Coroutine[Any, Any, object]]
    ids: Callable[[int], list[int]]


KINDS = [
    Kind(
        "send",
        lambda c, agent, n: c.send(agent, "work", {"id": n}, timeout_s=WAIT_S),
        lambda n: [n],
    ),
    Kind(
        "notify",
        lambda c, agent, n: c.notify(agent, "work", {"id": n}, timeout_s=WAIT_S),
        lambda n: [n],
    ),
    Kind(
        "send_many",
        lambda c, agent, n: c.send_many(
            [Request(agent, "work", {"id": 100 * n + i}, timeout_s=WAIT_S) for i in range(3)],
            concurrency=2,
        ),
        lambda n: [100 * n + i for i in range(3)],
    ),
]


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.name)
async def test_a_cancelled_call_leaves_nothing_behind(
    connect: Connect, unique: Callable[[str], str], kind: Kind
) -> None:
    """Calls cancelled at 38 points in time: each request is handled at most once (exactly
    once if the call returned, never if it had not run), no call stays pending, no task
    runs on, each handled request is answered once, and the client works on."""
    journal = Journal()
    agent = unique("cancel-call")
    worker = await serving(connect, journal, agent)
    async with RpcClient(await connect()) as client:
        assert (await client.send(agent, "work", {"id": -1}, timeout_s=WAIT_S)).ok  # warm up
        baseline = running_tasks()
        returned = cancelled_but_handled = 0
        for n, delay in enumerate(DELAYS):
            ids = kind.ids(n)
            call = asyncio.create_task(kind.start(client, agent, n))
            await cancel_after(call, delay)
            if not call.cancelled():
                returned += 1
                assert call.exception() is None, (delay, call.exception())
                expected = [{"id": i} for i in ids]
                result = data_of(call.result())
                if kind.name == "send":
                    assert result == expected[0]
                elif kind.name == "send_many":
                    assert result == expected
                else:
                    assert result is None
            assert client.pending_calls == 0, delay
            # The worker takes requests one at a time in queue order: once this one is
            # answered, every request published before it has been handled.
            barrier = await client.send(agent, "work", {"id": 10_000 + n}, timeout_s=WAIT_S)
            assert barrier.ok, (delay, barrier)
            handled = [journal.finished.count(i) for i in ids]
            assert max(handled) <= 1, f"handled twice (cancelled after {delay}s)"
            if not call.cancelled():
                assert min(handled) == 1, f"a request of a call that returned was lost ({delay}s)"
            elif delay is None:
                assert max(handled) == 0, "a call cancelled before it ran was sent"
            else:
                cancelled_but_handled += sum(handled)
        assert returned > 0, "the delays did not span a whole call"
        assert len(journal.finished) == len(set(journal.finished))
        # (The last reply can reach us before the worker has its confirm and counts it.)
        await wait_until(lambda: worker.in_flight == 0, timeout_s=WAIT_S, what="idle")
        stats = worker.stats
        assert stats.replied + stats.acked_without_reply == len(journal.finished)
        assert client.late_replies <= cancelled_but_handled
        await assert_no_task_leaked(baseline)
    await worker.stop()


async def test_cancelling_calls_does_not_disturb_the_calls_beside_them(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    """60 calls at once on one client, every third cancelled at staggered times: every other
    call gets its own reply, and the connection never drops (a cancelled publish or reply
    wait must not close a channel that the other calls share)."""
    journal = Journal()
    agent = unique("cancel-beside")
    worker = await serving(connect, journal, agent, concurrency=8)
    transport = await connect()
    lost: list[BaseException | None] = []
    transport.on_connection_lost(lost.append)
    async with RpcClient(transport) as client:
        for _round in range(3):
            calls = {
                i: asyncio.create_task(client.send(agent, "work", {"id": i}, timeout_s=WAIT_S))
                for i in range(60)
            }
            victims = [calls[i] for i in range(0, 60, 3)]
            for n, victim in enumerate(victims):
                await asyncio.sleep(0.0001 * n)
                victim.cancel()
            await asyncio.wait(calls.values(), timeout=WAIT_S)
            for i, call in calls.items():
                if call.cancelled():
                    continue
                reply = call.result()
                assert reply.ok, (i, reply)
                assert reply.data == {"id": i}
            survivors = [i for i, call in calls.items() if not call.cancelled()]
            assert len(survivors) >= 40
            assert client.pending_calls == 0
            journal.finished.clear()
    assert lost == [], "the connection was lost"
    await worker.stop()


async def test_aclose_ends_every_call_in_flight(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    """aclose() at several points of 6 calls in flight: each ends with its reply or
    ``SHUTTING_DOWN`` (the held one always), none hangs, the reply queue is deleted."""
    journal = Journal()
    agent = unique("cancel-aclose")
    worker = await serving(connect, journal, agent, concurrency=4)
    transport = await connect()
    for delay in (0.0, 0.0005, 0.001, 0.002, 0.005, 0.02):
        client = RpcClient(transport)
        await client.start()
        calls = [
            asyncio.create_task(client.send(agent, "work", {"id": i}, timeout_s=WAIT_S))
            for i in range(5)
        ]
        calls.append(asyncio.create_task(client.send(agent, "hold", {"id": 99})))
        await asyncio.sleep(delay)
        await client.aclose()
        _done, hanging = await asyncio.wait(calls, timeout=WAIT_S)
        assert not hanging, f"a call still waits after aclose() (delay {delay})"
        replies = [call.result() for call in calls]
        assert replies[-1].code == "SHUTTING_DOWN", replies[-1]
        for i, reply in enumerate(replies[:-1]):
            assert reply.code == "SHUTTING_DOWN" or reply.data == {"id": i}, (delay, reply)
        assert client.pending_calls == 0
        with pytest.raises(QueueNotFoundError):
            await transport.queue_info(client.reply_queue)
    journal.gate.set()
    await worker.stop()


async def test_a_cancelled_aclose_can_be_finished(connect: Connect) -> None:
    """aclose() cancelled after k loop steps, then called again, for clients sharing one
    transport: each time the reply queue is deleted and the connection survives."""
    transport = await connect()
    lost: list[BaseException | None] = []
    transport.on_connection_lost(lost.append)
    left: list[int] = []
    for k in range(16):
        client = RpcClient(transport)
        await client.start()
        closing = asyncio.create_task(client.aclose())
        for _ in range(k):
            await asyncio.sleep(0)
        await cancel_after(closing, None)
        await asyncio.wait_for(client.aclose(), WAIT_S)
        await asyncio.sleep(0.01)  # a connection-level error from the broker comes now
        if lost:
            break
        try:
            await transport.queue_info(client.reply_queue)
        except QueueNotFoundError:
            continue
        left.append(k)
    # Both: reply queues (and consumers) left behind, and the connection killed by the
    # broker (504 CHANNEL_ERROR) when the cancellation hits the channel close.
    outcome = {"queues left at steps": left, "connection lost": lost}
    assert outcome == {"queues left at steps": [], "connection lost": []}, f"k={k}"


# -- the worker ----------------------------------------------------------------------------

BACKLOG = 60
CONCURRENCY = 4


async def ready(transport: Transport, queue: str) -> int:
    try:
        return (await transport.queue_info(queue)).messages
    except QueueNotFoundError:
        return 0


@pytest.mark.parametrize("grace_s", [10.0, 0.0], ids=["graceful", "no-grace"])
@pytest.mark.parametrize("j", [1, 25])
async def test_cancelling_serve_mid_backlog_loses_nothing(
    connect: Connect, unique: Callable[[str], str], grace_s: float, j: int
) -> None:
    """serve() cancelled once j requests of 60 are handled: afterwards every request is
    handled and acked or back in the queue (with a grace period never both), no task
    runs on; a fresh worker handles the rest, nothing is dead-lettered, and a request
    handled twice (only without grace) was redelivered."""
    journal = Journal()
    agent = unique("cancel-serve")
    queue, retry = TOPOLOGY.agent_queue(agent), TOPOLOGY.agent_retry_queue(agent, 1)
    observer = await connect()
    placeholder = await serving(connect, Journal(), agent)
    await placeholder.stop()
    async with RpcClient(observer) as client:
        for i in range(BACKLOG):
            await client.notify(agent, "work", {"id": i}, timeout_s=120)

    def worker_on(tap: Tap, grace: float) -> Worker:
        settings = WorkerSettings(concurrency=CONCURRENCY, grace_period_s=grace, retry=POLICY)
        paced = Paced(journal, name=agent, delay_s=0.002)
        return Worker(cast("Transport", tap), [paced], settings=settings)

    first = Tap(await connect())
    baseline = running_tasks()
    worker = worker_on(first, grace_s)
    task = asyncio.create_task(worker.serve())

    def cancel_at_j(_id: int) -> None:
        if len(journal.finished) == j:
            task.cancel()

    journal.on_finish = cancel_at_j
    await asyncio.wait({task}, timeout=WAIT_S)
    journal.on_finish = None
    assert task.cancelled(), task
    assert worker.in_flight == 0
    assert not any(a.is_running for a in worker.agents), "the agent was not shut down"
    await assert_no_task_leaked(baseline)
    handled = Counter(journal.finished)
    assert all(n == 1 for n in handled.values()), handled

    async def accounted() -> bool:  # nacks are not awaited: the broker counts them soon
        queued = await ready(observer, queue) + await ready(observer, retry)
        return len(handled) + queued >= BACKLOG

    await wait_until(accounted, timeout_s=WAIT_S, what="every request handled or queued")
    overlap = len(handled) + await ready(observer, queue) + await ready(observer, retry) - BACKLOG
    assert overlap == 0 if grace_s else overlap <= CONCURRENCY

    second = Tap(await connect())
    successor = worker_on(second, 10.0)
    await successor.start()

    async def drained() -> bool:
        empty = await ready(observer, queue) + await ready(observer, retry) == 0
        return empty and set(journal.finished) == set(range(BACKLOG))

    await wait_until(drained, timeout_s=WAIT_S, what="a fresh worker to handle the rest")
    await successor.stop()
    assert await ready(observer, TOPOLOGY.agent_dead_letter_queue(agent)) == 0
    twice = {i for i, n in Counter(journal.finished).items() if n > 1}
    again = {
        Work.model_validate_json(e.body).id
        for e in first.deliveries(queue) + second.deliveries(queue)
        if e.redelivered or (e.headers or {}).get("x-attempt", 1) != 1
    }
    assert twice <= again, "handled twice without a redelivery"
    if grace_s:
        assert twice == set()
    await assert_no_task_leaked(baseline)


async def cancel_and_wait(task: asyncio.Task[Any], wait_s: float = 0.5) -> bool:
    """Cancel ``task``; True if it ended, False if it ran on (the cancellation was lost)."""
    task.cancel()
    await asyncio.wait({task}, timeout=wait_s)
    return task.done()


async def test_cancelling_serve_while_it_starts_leaves_no_consumer(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    """serve() cancelled at 33 points of its start (declares, consume, first deliveries):
    each time the agent queue is left with no consumer (none orphaned on a channel the
    worker lost track of, bouncing requests), every request handled or still queued, and
    no task running on.

    (RabbitTransport can lose the cancellation or turn it into ``BrokerUnavailableError``:
    see the xfail tests below. A lost one is sent again; either ending is accepted here.)
    """
    journal = Journal()
    agent = unique("cancel-start")
    queue = TOPOLOGY.agent_queue(agent)
    observer = await connect()
    await (await serving(connect, journal, agent)).stop()
    async with RpcClient(observer) as client:
        for i in range(5):
            await client.notify(agent, "work", {"id": i}, timeout_s=120)
    transport = await connect()
    baseline = running_tasks()
    phases = Counter[str]()
    for n, delay in enumerate([*(n * 0.0002 for n in range(30)), 0.01, 0.02, 0.05]):
        settings = WorkerSettings(concurrency=1, grace_period_s=10, retry=POLICY)
        worker = Worker(transport, [Paced(journal, name=agent)], settings=settings)
        task = asyncio.create_task(worker.serve())
        await asyncio.sleep(delay)
        phases["serving" if worker.is_ready else "starting"] += 1
        if not await cancel_and_wait(task):
            await cancel_and_wait(task, WAIT_S)
        assert task.cancelled() or isinstance(task.exception(), TransportError), task

        async def settled() -> bool:
            info = await observer.queue_info(queue)
            return info.consumers == 0 and info.messages + len(set(journal.finished)) >= 5

        await wait_until(settled, timeout_s=WAIT_S, what=f"no consumer left (attempt {n})")
        await assert_no_task_leaked(baseline)
    assert phases["starting"] > 0, phases
    assert phases["serving"] > 0, phases
    assert len(journal.finished) == len(set(journal.finished)), "a request handled twice"


async def declare_cancelled_after(transport: RabbitTransport, k: int) -> str:
    """Run declare_exchange(), cancel it after k loop steps; how it ended."""
    declare = asyncio.create_task(transport.declare_exchange("agents", ExchangeKind.DIRECT))
    for _ in range(k):
        await asyncio.sleep(0)
    accepted = declare.cancel()
    await asyncio.wait({declare}, timeout=WAIT_S)
    if declare.cancelled():
        return "cancelled"
    error = declare.exception()
    ended = "returned" if error is None else type(error).__name__
    return ended if accepted else f"{ended} before the cancellation"


async def test_a_cancelled_broker_operation_raises_cancelled_error(connect: Connect) -> None:
    """declare_exchange() cancelled after k loop steps, k = 0..11 (its whole round trip):
    once cancel() is accepted, the call ends with CancelledError, never with its result
    or a transport error."""
    transport = await connect()
    outcomes = {k: await declare_cancelled_after(transport, k) for k in range(12)}
    await asyncio.sleep(0.05)  # let a channel closed by a cancelled RPC finish closing
    wrong = {k: o for k, o in outcomes.items() if o != "cancelled" and "before" not in o}
    assert wrong == {}, outcomes


async def test_a_cancelled_broker_operation_does_not_fail_the_next_one(
    connect: Connect,
) -> None:
    """declare_exchange() cancelled after k loop steps, then declared again uncancelled,
    k = 0..11: the second declare always succeeds."""
    transport = await connect()
    failed: dict[int, str] = {}
    for k in range(12):
        await declare_cancelled_after(transport, k)
        try:
            await transport.declare_exchange("agents", ExchangeKind.DIRECT)
        except TransportError as exc:
            failed[k] = str(exc)
            await asyncio.sleep(0.05)  # the control channel finishes closing
    assert failed == {}


async def test_a_worker_cancelled_while_it_starts_ends_cancelled(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    """serve() cancelled during its start, up to 40 times: each time it ends cancelled,
    rather than serving on or failing as if the broker were unavailable."""
    agent = unique("cancel-lost")
    transport = await connect()
    wrong: list[tuple[int, str]] = []
    for n in range(40):
        worker = Worker(transport, [Paced(Journal(), name=agent)])
        task = asyncio.create_task(worker.serve())
        await asyncio.sleep(0.0001 * n)
        if not await cancel_and_wait(task, 1.0):
            wrong.append((n, "served on"))
            await cancel_and_wait(task, WAIT_S)
        elif not task.cancelled():
            wrong.append((n, repr(task.exception())))
        if wrong:
            break
    assert wrong == []


async def test_a_cancelled_consume_handles_nothing(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    """consume() cancelled after k loop steps, k = 0..29, on a queue holding messages:
    when it ends cancelled, its handler never ran, even for deliveries that arrived with
    the consume-ok (their acks would die with the abandoned channel, and the messages
    would be handled twice); when it returned, what it handled was acked. Either way
    every message is handled at most once and the rest stay queued."""
    transport = await connect()
    queue = await transport.declare_queue(QueueSpec(name=unique("cancel-consume")))
    total = 40
    for i in range(total):
        await transport.publish(Envelope(str(i).encode(), routing_key=queue), timeout_s=WAIT_S)
    handled: list[bytes] = []
    wrong: list[str] = []
    outcomes = Counter[str]()
    for k in range(30):
        before = len(handled)

        async def handler(delivery: Delivery) -> None:
            handled.append(delivery.envelope.body)
            await delivery.ack()

        task = asyncio.create_task(transport.consume(queue, handler, prefetch=3))
        for _ in range(k):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.wait({task}, timeout=WAIT_S)
        assert task.done(), f"consume() cancelled after {k} steps did not end"
        if task.cancelled():
            outcomes["cancelled"] += 1
        else:
            outcomes["returned"] += 1
            await task.result().close()

        async def released() -> bool:
            info = await transport.queue_info(queue)
            return info.consumers == 0 and info.messages + len(set(handled)) >= total

        await wait_until(released, timeout_s=WAIT_S, what=f"the queue released (k={k})")
        if task.cancelled() and len(handled) > before:
            wrong.append(f"k={k}: a cancelled consume handled {handled[before:]}")
        queued = (await transport.queue_info(queue)).messages
        if queued + len(set(handled)) != total:
            wrong.append(f"k={k}: {queued} queued + {len(set(handled))} handled != {total}")
    assert outcomes["cancelled"] > 0, outcomes
    assert wrong == []
    assert len(handled) == len(set(handled)), "a message handled twice"
