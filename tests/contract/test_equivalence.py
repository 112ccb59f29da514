"""Equivalence: any interleaving of publish, consume and settle looks the same on both brokers.

Hypothesis writes programs over one queue (``x-max-priority`` 5, dead-lettering through a
direct exchange to a dead-letter queue); each program runs on a fresh
:class:`InMemoryBroker` and on RabbitMQ (unique names per example on the module's vhost),
and the two observable traces must be equal:

* the events in order: each publish, each delivery with its ``redelivered`` flag, each
  settlement, and what a closing consumer gave back;
* the dead-letter queue at the end, in order;
* the queue at the end: its ready count, then its contents in delivery order.

Both traces must also keep at-least-once: a message is delivered only while it is in the
queue, so again only after a ``nack(requeue=True)`` or a close gave it back (and then with
``redelivered=True``); at the end every published message is acked once, dead-lettered
once, or still in the queue.

Why the RabbitMQ run is deterministic: there is at most one consumer, and after every
operation the runner waits (bounded) until that consumer holds as many deliveries as the
broker must have pushed, ``min(prefetch, held + ready)``, counting ``ready`` from the
trace itself (a lost message shows as a timeout). So every operation starts from a quiet
broker: a confirmed publish is in the queue, a nack's redelivery has arrived, and a closed
channel's deliveries are back (``channel.close-ok`` comes after the queue requeued them).
The one settlement with no visible effect, an ack or reject while nothing is ready, only
frees a place that the next publish would take in either order.

RabbitMQ is the truth: a difference is a bug of the in-memory broker (see
``tests/contract/conftest.py``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from amqp_agents.config import ConnectionSettings
from amqp_agents.models.envelope import Envelope
from amqp_agents.testing import url_for_vhost
from amqp_agents.transport.base import (
    ConsumerHandle,
    Delivery,
    ExchangeKind,
    QueueSpec,
    Transport,
)
from amqp_agents.transport.memory import InMemoryTransport
from amqp_agents.transport.rabbitmq import RabbitTransport

MAX_PRIORITY = 5
PUBLISH_TIMEOUT_S = 5.0
RABBIT_WAIT_S = 5.0
"""How long the RabbitMQ run waits for a delivery that must come."""
MEMORY_WAIT_S = 1.0
"""The same for the in-memory run: everything happens in-process."""


# -- programs ------------------------------------------------------------------------


class Settlement(StrEnum):
    """How a delivery is settled."""

    ACK = "ack"
    """Done: the broker forgets the message."""
    NACK = "nack"
    """``nack(requeue=True)``: back to its place in the queue, redelivered."""
    REJECT = "reject"
    """Refused: dead-lettered."""


@dataclass(frozen=True)
class Publish:
    """Publish the next message (messages are numbered from 0 in publish order)."""

    priority: int | None

    def __repr__(self) -> str:
        return f"Publish({self.priority})"


@dataclass(frozen=True)
class Settle:
    """Settle one unsettled delivery (a no-op when there is none)."""

    how: Settlement
    pick: int
    """Which one, in arrival order, modulo how many are unsettled."""

    def __repr__(self) -> str:
        return f"Settle(Settlement.{self.how.name}, {self.pick})"


@dataclass(frozen=True)
class Consume:
    """(Re)start the consumer: close the current one, then consume with ``prefetch``."""

    prefetch: int

    def __repr__(self) -> str:
        return f"Consume({self.prefetch})"


@dataclass(frozen=True)
class Stop:
    """Close the consumer (a no-op when there is none): its unsettled deliveries return."""

    def __repr__(self) -> str:
        return "Stop()"


Operation = Publish | Settle | Consume | Stop


def _consumer_change(prefetch: int) -> Consume | Stop:
    return Consume(prefetch) if prefetch else Stop()


_priorities = st.none() | st.integers(0, MAX_PRIORITY + 2)
# one_of picks its branches alike: a publish is twice as likely as each settlement, and
# stopping is the rarest change of consumer (with no consumer, settling does nothing).
operations: st.SearchStrategy[Operation] = st.one_of(
    st.builds(Publish, _priorities),
    st.builds(Publish, _priorities),
    *(st.builds(Settle, st.just(how), st.integers(0, 3)) for how in Settlement),
    st.integers(0, 3).map(_consumer_change),
)
# Flat lists are short (about 5 on average); runs of 1-3 operations give about 12 and
# still shrink one operation at a time.
programs: st.SearchStrategy[list[Operation]] = st.lists(
    st.lists(operations, min_size=1, max_size=3), max_size=10
).map(lambda runs: [operation for run in runs for operation in run])


# -- traces --------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """Something observable: ``kind`` is publish, deliver, ack, nack, reject or return."""

    kind: str
    message: int
    redelivered: bool = False

    def __repr__(self) -> str:
        return f"{self.kind}({self.message}{', redelivered' if self.redelivered else ''})"


@dataclass(frozen=True)
class Trace:
    """What a program did on one broker."""

    events: tuple[Event, ...]
    dead_lettered: tuple[int, ...]
    """The dead-letter queue at the end, in order."""
    ready: int
    """Ready messages in the queue at the end (no consumer left)."""
    remaining: tuple[tuple[int, bool], ...]
    """The queue at the end in delivery order: (message, redelivered)."""


# -- running a program ---------------------------------------------------------------


@dataclass(eq=False)
class _Runner:
    """Runs a program on one transport; holds the consumer and the trace so far."""

    transport: Transport
    queue: str
    wait_s: float
    events: list[Event] = field(default_factory=list)
    published: int = 0
    ready: int = 0
    """Messages that must be in the queue, by the trace (not asked from the broker)."""
    consumer: ConsumerHandle | None = None
    prefetch: int = 0
    inbox: asyncio.Queue[Delivery] = field(default_factory=asyncio.Queue)
    held: list[tuple[int, Delivery]] = field(default_factory=list)

    async def apply(self, operation: Operation) -> None:
        match operation:
            case Publish(priority):
                envelope = Envelope(
                    body=str(self.published).encode(), routing_key=self.queue, priority=priority
                )
                await self.transport.publish(envelope, timeout_s=PUBLISH_TIMEOUT_S)
                self.events.append(Event("publish", self.published))
                self.published += 1
                self.ready += 1
            case Settle(how, pick):
                if not self.held:
                    return
                message, delivery = self.held.pop(pick % len(self.held))
                if how is Settlement.ACK:
                    await delivery.ack()
                elif how is Settlement.NACK:
                    await delivery.nack(requeue=True)
                    self.ready += 1
                else:
                    await delivery.reject()
                self.events.append(Event(how.value, message))
            case Consume(prefetch):
                await self.stop()
                inbox: asyncio.Queue[Delivery] = asyncio.Queue()
                self.inbox, self.prefetch = inbox, prefetch

                async def handler(delivery: Delivery) -> None:
                    inbox.put_nowait(delivery)

                self.consumer = await self.transport.consume(self.queue, handler, prefetch=prefetch)
            case Stop():
                await self.stop()
        await self._take_pushed()

    async def _take_pushed(self) -> None:
        """Wait for the deliveries the broker must push now; fail if one is missing."""
        if self.consumer is None:
            return
        due = min(self.prefetch, len(self.held) + self.ready)
        while len(self.held) < due:
            try:
                delivery = await asyncio.wait_for(self.inbox.get(), self.wait_s)
            except TimeoutError:
                raise AssertionError(
                    f"{type(self.transport).__name__}: {len(self.held)} deliveries held,"
                    f" {due} due (prefetch {self.prefetch}, {self.ready} ready): lost?"
                    f" events so far: {self.events}"
                ) from None
            message = int(delivery.envelope.body)
            self.events.append(Event("deliver", message, delivery.envelope.redelivered))
            self.held.append((message, delivery))
            self.ready -= 1
        if not self.inbox.empty():
            extra = self.inbox.get_nowait().envelope
            raise AssertionError(
                f"{type(self.transport).__name__}: a delivery beyond prefetch or the queue:"
                f" {int(extra.body)} (redelivered={extra.redelivered}); events: {self.events}"
            )

    async def stop(self) -> None:
        """Close the consumer; the broker takes back what it held."""
        if self.consumer is None:
            return
        await self.consumer.close()
        self.consumer = None
        self.events.extend(Event("return", message) for message, _ in self.held)
        self.ready += len(self.held)
        self.held.clear()


async def _drain(transport: Transport, queue: str, count: int, wait_s: float) -> list[Envelope]:
    """The first ``count`` messages of ``queue`` in delivery order (then given back)."""
    if count == 0:
        return []
    arrived: asyncio.Queue[Delivery] = asyncio.Queue()

    async def handler(delivery: Delivery) -> None:
        arrived.put_nowait(delivery)

    consumer = await transport.consume(queue, handler, prefetch=count)
    try:
        return [(await asyncio.wait_for(arrived.get(), wait_s)).envelope for _ in range(count)]
    finally:
        await consumer.close()


async def run_program(transport: Transport, program: Sequence[Operation], wait_s: float) -> Trace:
    """Run ``program`` on fresh topology of a connected transport; return its trace."""
    suffix = uuid.uuid4().hex[:8]
    dlx = f"equivalence-dlx-{suffix}"
    await transport.declare_exchange(dlx, ExchangeKind.DIRECT, durable=False)
    # Exclusive: both queues go away with the connection.
    dead = await transport.declare_queue(
        QueueSpec(f"equivalence-dead-{suffix}", durable=False, exclusive=True)
    )
    await transport.bind_queue(dead, dlx, "dead")
    queue = await transport.declare_queue(
        QueueSpec(
            f"equivalence-work-{suffix}",
            durable=False,
            exclusive=True,
            arguments={
                "x-max-priority": MAX_PRIORITY,
                "x-dead-letter-exchange": dlx,
                "x-dead-letter-routing-key": "dead",
            },
        )
    )
    runner = _Runner(transport, queue, wait_s)
    for operation in program:
        await runner.apply(operation)
    await runner.stop()
    ready = (await transport.queue_info(queue)).messages
    remaining = await _drain(transport, queue, ready, wait_s)
    dead_count = (await transport.queue_info(dead)).messages
    dead_lettered = await _drain(transport, dead, dead_count, wait_s)
    return Trace(
        events=tuple(runner.events),
        dead_lettered=tuple(int(e.body) for e in dead_lettered),
        ready=ready,
        remaining=tuple((int(e.body), e.redelivered) for e in remaining),
    )


async def run_on_memory(program: Sequence[Operation]) -> Trace:
    async with InMemoryTransport() as transport:
        return await run_program(transport, program, MEMORY_WAIT_S)


async def run_on_rabbit(program: Sequence[Operation], url: str) -> Trace:
    settings_ = ConnectionSettings.model_validate(
        {"url": url, "client_name": f"equivalence-{uuid.uuid4().hex[:8]}"}
    )
    async with RabbitTransport(settings_) as transport:
        return await run_program(transport, program, RABBIT_WAIT_S)


# -- the invariants ------------------------------------------------------------------


def check_at_least_once(trace: Trace) -> None:
    """Nothing lost, nothing delivered twice unless given back, redelivered flags right."""
    state: dict[int, str] = {}  # ready, held, acked or dead
    given_back: set[int] = set()
    acked: list[int] = []
    rejected: list[int] = []
    for event in trace.events:
        message, now = event.message, state.get(event.message)
        if event.kind == "publish":
            assert now is None, f"{message} published twice"
            state[message] = "ready"
            continue
        if event.kind == "deliver":
            assert now == "ready", f"{event!r} while the message is {now}"
            assert event.redelivered == (message in given_back), f"wrong flag: {event!r}"
            state[message] = "held"
            continue
        assert now == "held", f"{event!r} of a message that is {now}"
        if event.kind == "ack":
            state[message] = "acked"
            acked.append(message)
        elif event.kind == "reject":
            state[message] = "dead"
            rejected.append(message)
        else:  # nack(requeue=True), or returned by a closing consumer
            state[message] = "ready"
            given_back.add(message)
    assert len(acked) == len(set(acked))
    assert trace.dead_lettered == tuple(rejected), "dead-lettered, in reject order"
    left = sorted(m for m, s in state.items() if s == "ready")
    assert sorted(m for m, _ in trace.remaining) == left, "what is left is what was not settled"
    assert trace.ready == len(left)
    assert all(flag == (m in given_back) for m, flag in trace.remaining)
    outcomes = Counter(state.values())
    assert outcomes["held"] == 0
    assert outcomes["acked"] + outcomes["dead"] + outcomes["ready"] == len(state)


# -- the property --------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(120)
@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(program=programs)
# A backlog leaves in priority order (above the max counts as the max, none as 0).
@example(
    program=[Publish(None), Publish(5), Publish(2), Publish(7), Publish(0), Consume(1)]
    + [Settle(Settlement.ACK, 0)] * 5
)
# nack and close give messages back to their original places, flagged redelivered.
@example(
    program=[
        *[Publish(1)] * 4,
        Consume(2),
        Settle(Settlement.NACK, 1),
        Settle(Settlement.NACK, 0),
        Consume(3),
        Settle(Settlement.ACK, 2),
        Stop(),
        Consume(1),
    ]
)
# What the consumer has room for goes straight to it, whatever comes later; then the
# backlog by priority. Dead letters keep the reject order.
@example(
    program=[
        Consume(2),
        Publish(0),
        Publish(None),
        Publish(3),
        Publish(5),
        Settle(Settlement.REJECT, 1),
        Settle(Settlement.REJECT, 0),
        Settle(Settlement.REJECT, 1),
    ]
)
def test_random_programs_look_the_same_on_rabbitmq_and_in_memory(
    broker_url: str, module_vhost: str, program: list[Operation]
) -> None:
    """Same deliveries, flags, settlements, dead letters and leftovers on both brokers."""
    url = url_for_vhost(broker_url, module_vhost)

    async def both() -> tuple[Trace, Trace]:
        # One event loop per example, closed with everything in it.
        return await run_on_rabbit(program, url), await run_on_memory(program)

    rabbit, memory = asyncio.run(both())
    assert memory == rabbit, f"program {program}:\n  rabbitmq {rabbit}\n  memory   {memory}"
    check_at_least_once(rabbit)
