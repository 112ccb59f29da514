"""The event bus on the real broker: topic routing, groups, private queues, dead-lettering,
publish_and_wait, plain-AMQP publishers, agents' ``@on_event`` handlers in a worker.

Every test uses event types and groups of its own (``unique``), so tests sharing the
module's vhost never see each other's events; the wildcard test, which binds ``#``,
gets a vhost of its own.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pika
import pytest
from pydantic import BaseModel, ConfigDict

from amqp_agents.errors import QueueNotFoundError
from amqp_agents.events.bus import EventBus
from amqp_agents.examples.tasks import app
from amqp_agents.models.envelope import Envelope
from amqp_agents.models.messages import ErrorCode, Event
from amqp_agents.models.topic import topic_matches
from amqp_agents.models.topology import CONTENT_TYPE_JSON, Topology
from amqp_agents.models.wire import encode_event
from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.agent import Agent, on_event
from amqp_agents.runtime.worker import Worker
from amqp_agents.testing import BrokerAdmin, url_for_vhost
from amqp_agents.transport.base import Delivery, QueueSpec
from amqp_agents.transport.rabbitmq import RabbitTransport
from tests.support import wait_until

Connect = Callable[..., Awaitable[RabbitTransport]]
Unique = Callable[[str], str]
OpenBus = Callable[..., Awaitable[EventBus]]

TOPOLOGY = Topology()
ABSENCE_WINDOW_S = 0.3
"""How long an absence check waits *after* a positive control proved delivery happens."""


# -- helpers -------------------------------------------------------------------------


async def queue_depth(transport: RabbitTransport, queue: str) -> int:
    """Ready messages in ``queue`` (passive declare)."""
    return (await transport.queue_info(queue)).messages


async def holds_at_least(transport: RabbitTransport, queue: str, count: int) -> bool:
    """True once ``queue`` holds at least ``count`` ready messages."""
    return await queue_depth(transport, queue) >= count


async def holds_at_most(transport: RabbitTransport, queue: str, count: int) -> bool:
    """True once ``queue`` holds at most ``count`` ready messages."""
    return await queue_depth(transport, queue) <= count


async def queues(admin: BrokerAdmin, vhost: str) -> dict[str, Any]:
    """``rabbitmqctl list_queues`` off the event loop."""
    return await asyncio.to_thread(admin.list_queues, vhost)


class Inbox:
    """An event handler that keeps every event it is given."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def handle(self, event: Event) -> None:
        self.events.append(event)

    @property
    def types(self) -> list[str]:
        return [event.type for event in self.events]

    @property
    def payloads(self) -> list[dict[str, Any]]:
        return [event.payload for event in self.events]


class Order(BaseModel):
    """A payload schema for the validation tests."""

    model_config = ConfigDict(extra="forbid")

    id: int


def raw_event(routing_key: str, body: bytes, **properties: Any) -> Envelope:
    """An event-shaped message with any body, as another publisher could send it."""
    options: dict[str, Any] = {
        "content_type": CONTENT_TYPE_JSON,
        "message_id": uuid.uuid4().hex,
        "timestamp": int(time.time()),
    }
    options.update(properties)
    return Envelope(
        body=body, exchange=TOPOLOGY.events_exchange, routing_key=routing_key, **options
    )


@pytest.fixture
async def open_bus(connect: Connect) -> AsyncIterator[OpenBus]:
    """``await open_bus(transport=None, **options)`` -> a started bus, closed after the test."""
    buses: list[EventBus] = []

    async def open_(transport: RabbitTransport | None = None, **options: Any) -> EventBus:
        bus = EventBus(transport or await connect(), **options)
        await bus.start()
        buses.append(bus)
        return bus

    yield open_
    for bus in buses:
        await bus.aclose()


# -- 1. topic routing: the matcher and the broker agree --------------------------------

PATTERNS = [
    "#",
    "*",
    "*.*",
    "",
    "a",
    "a.*",
    "*.b",
    "a.#",
    "#.b",
    "a.#.b",
    "a.*.b",
    "a.#.#.b",
    "a..b",
    "a.",
    "#.#",
    "*.#",
]
KEYS = ["", ".", "a", "b", "a.b", "a.x.b", "a.x.y.b", "a..b", "a.", ".b", "a.b.c", "b.a.b", "x.y"]
MARKER = "zz-marker"


async def test_wildcards_route_exactly_what_topic_matches_predicts(
    broker_url: str, fresh_vhost: str, connect: Connect, open_bus: OpenBus, unique: Unique
) -> None:
    """For every (pattern, key) pair the broker delivers iff topic_matches says so."""
    transport = await connect(url_for_vhost(broker_url, fresh_vhost))
    # prefetch=1: a queue's next event is delivered only once the previous one is
    # settled, so when a group has seen the marker it has seen everything before it.
    bus = await open_bus(transport, prefetch=1)
    inboxes: dict[str, Inbox] = {}
    markers: set[str] = set()
    groups: dict[str, str] = {}

    def marker_handler(group: str) -> Callable[[], Awaitable[None]]:
        async def saw_marker() -> None:
            markers.add(group)

        return saw_marker

    for pattern in PATTERNS:
        group = unique("wild")
        groups[pattern] = group
        inboxes[pattern] = Inbox()
        await bus.subscribe(pattern, inboxes[pattern].handle, group=group)
        await bus.subscribe(MARKER, marker_handler(group), group=group)

    for key in KEYS:
        envelope = encode_event(TOPOLOGY, key, b"{}", message_id=uuid.uuid4().hex, max_bytes=1024)
        await transport.publish(envelope, timeout_s=10)
    await bus.publish(MARKER)
    await wait_until(
        lambda: len(markers) == len(PATTERNS), what="every group to receive the marker"
    )

    mismatches = {}
    for pattern in PATTERNS:
        received = sorted(t for t in inboxes[pattern].types if t != MARKER)
        predicted = sorted(key for key in KEYS if topic_matches(pattern, key))
        if received != predicted:
            mismatches[pattern] = {"received": received, "predicted": predicted}
    assert mismatches == {}
    # Anything the broker routed but the bus's matcher refused would be dead-lettered.
    for pattern, group in groups.items():
        dead = TOPOLOGY.group_dead_letter_queue(group)
        assert await queue_depth(transport, dead) == 0, f"pattern {pattern!r}"
    # The table is not trivial: both outcomes occur for the edge-case patterns.
    assert {topic_matches("a.#.b", k) for k in KEYS} == {True, False}


# -- 2, 3. groups: fan-out across groups, competing consumers within one --------------


async def test_every_group_gets_every_event(open_bus: OpenBus, unique: Unique) -> None:
    """Two groups subscribed to the same pattern each handle all N events once."""
    prefix, total = unique("t"), 20
    bus = await open_bus()
    first, second = Inbox(), Inbox()
    await bus.subscribe(f"{prefix}.*", first.handle, group=unique("billing"))
    await bus.subscribe(f"{prefix}.*", second.handle, group=unique("audit"))

    ids = [await bus.publish(f"{prefix}.happened", {"n": n}) for n in range(total)]

    await wait_until(
        lambda: len(first.events) >= total and len(second.events) >= total,
        what="both groups to receive every event",
    )
    for inbox in (first, second):
        assert sorted(e.payload["n"] for e in inbox.events) == list(range(total))
        assert sorted(e.id for e in inbox.events) == sorted(ids)


async def test_one_group_on_two_connections_shares_the_events(
    connect: Connect, open_bus: OpenBus, unique: Unique
) -> None:
    """Two buses (two pods) in one group: each event is handled exactly once, by either."""
    prefix, group, total = unique("t"), unique("workers"), 200
    handled: dict[str, list[int]] = {"pod-a": [], "pod-b": []}

    def handler(pod: str) -> Callable[[dict[str, Any]], Awaitable[None]]:
        async def handle(payload: dict[str, Any]) -> None:
            await asyncio.sleep(0)  # let the other consumer's deliveries in
            handled[pod].append(payload["n"])

        return handle

    pod_a = await open_bus(await connect(), prefetch=2)
    pod_b = await open_bus(await connect(), prefetch=2)
    await pod_a.subscribe(f"{prefix}.job", handler("pod-a"), group=group)
    await pod_b.subscribe(f"{prefix}.job", handler("pod-b"), group=group)
    publisher = await open_bus()

    for n in range(total):
        await publisher.publish(f"{prefix}.job", {"n": n})

    await wait_until(
        lambda: len(handled["pod-a"]) + len(handled["pod-b"]) >= total,
        timeout_s=20,
        what="every event to be handled",
    )
    counts = Counter(handled["pod-a"] + handled["pod-b"])
    assert sorted(counts) == list(range(total))
    assert [n for n, c in counts.items() if c > 1] == []
    assert handled["pod-a"], "pod A got no events"
    assert handled["pod-b"], "pod B got no events"


# -- 4. private subscribers --------------------------------------------------------------


async def test_private_subscriber_sees_events_only_while_subscribed(
    connect: Connect,
    open_bus: OpenBus,
    unique: Unique,
    broker_admin: BrokerAdmin,
    module_vhost: str,
) -> None:
    """No group: events before subscribe and after unsubscribe are missed; the queue goes."""
    prefix = unique("t")
    pattern = f"{prefix}.*"
    publisher = await open_bus()
    control, listener = Inbox(), Inbox()
    await (await open_bus()).subscribe(pattern, control.handle)  # always subscribed
    bus = await open_bus()

    await publisher.publish(f"{prefix}.before")
    await wait_until(lambda: control.types == [f"{prefix}.before"], what="the control")

    queues_before = set(await queues(broker_admin, module_vhost))
    subscription = await bus.subscribe(pattern, listener.handle)
    new_queues = set(await queues(broker_admin, module_vhost)) - queues_before
    assert len(new_queues) == 1, new_queues
    (private_queue,) = new_queues
    assert private_queue.startswith("amq.gen-")

    await publisher.publish(f"{prefix}.during")
    await wait_until(lambda: listener.types == [f"{prefix}.during"], what="the subscriber")

    await bus.unsubscribe(subscription)
    assert bus.subscriptions == []
    await publisher.publish(f"{prefix}.after")
    await wait_until(lambda: len(control.events) == 3, what="the control to see 'after'")
    await asyncio.sleep(ABSENCE_WINDOW_S)  # absence check, after the positive control

    assert control.types == [f"{prefix}.before", f"{prefix}.during", f"{prefix}.after"]
    assert listener.types == [f"{prefix}.during"]
    assert private_queue not in await queues(broker_admin, module_vhost)


def bindings_of(admin: BrokerAdmin, vhost: str, queue: str) -> set[str]:
    """Routing keys of the bindings from the events exchange to ``queue``."""
    out = admin.run(
        "list_bindings",
        "-p",
        vhost,
        "--no-table-headers",
        "source_name",
        "destination_name",
        "routing_key",
    )
    rows = (line.split("\t") for line in out.splitlines())
    return {
        row[2]
        for row in rows
        if len(row) == 3 and row[0] == TOPOLOGY.events_exchange and row[1] == queue
    }


async def test_private_unsubscribe_unbinds_only_the_unused_pattern(
    open_bus: OpenBus, unique: Unique, broker_admin: BrokerAdmin, module_vhost: str
) -> None:
    """Two private handlers share one queue: unsubscribing one removes just its binding."""
    prefix = unique("t")
    publisher = await open_bus()
    bus = await open_bus()
    kept, dropped, twin = Inbox(), Inbox(), Inbox()
    queues_before = set(await queues(broker_admin, module_vhost))
    await bus.subscribe(f"{prefix}.kept", kept.handle)
    twin_subscription = await bus.subscribe(f"{prefix}.kept", twin.handle)
    subscription = await bus.subscribe(f"{prefix}.dropped", dropped.handle)
    (private_queue,) = set(await queues(broker_admin, module_vhost)) - queues_before

    await bus.unsubscribe(subscription)
    await bus.unsubscribe(twin_subscription)  # its pattern is still used by `kept`

    assert await asyncio.to_thread(bindings_of, broker_admin, module_vhost, private_queue) == {
        f"{prefix}.kept"
    }
    await publisher.publish(f"{prefix}.dropped")
    await publisher.publish(f"{prefix}.kept")
    await wait_until(lambda: kept.types == [f"{prefix}.kept"], what="the kept handler")
    await asyncio.sleep(ABSENCE_WINDOW_S)  # absence check, after the positive control
    assert dropped.events == []
    assert twin.events == []


# -- 5. publish_and_wait -------------------------------------------------------------------


def _answerer(index: int) -> Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]:
    async def answer(payload: dict[str, Any]) -> dict[str, Any]:
        return {"responder": index, "x": payload["x"]}

    return answer


async def _responders(bus: EventBus, event_type: str, unique: Unique, count: int) -> None:
    """``count`` groups, each answering ``{"responder": index, "x": payload["x"]}``."""
    for index in range(count):
        await bus.subscribe(event_type, _answerer(index), group=unique(f"responder{index}"))


async def test_publish_and_wait_returns_the_expected_replies(
    open_bus: OpenBus, unique: Unique
) -> None:
    """Three groups answer: three successful replies with their data, before the timeout."""
    question = f"{unique('t')}.ask"
    await _responders(await open_bus(), question, unique, 3)
    asker = await open_bus()

    started = time.monotonic()
    replies = await asker.publish_and_wait(question, {"x": 7}, timeout_s=10, expected=3)
    elapsed = time.monotonic() - started

    assert [r.ok for r in replies] == [True, True, True]
    assert sorted(r.data["responder"] for r in replies) == [0, 1, 2]
    assert {r.data["x"] for r in replies} == {7}
    assert elapsed < 5, f"took {elapsed:.2f}s although every reply had arrived"


async def test_publish_and_wait_without_expected_waits_the_timeout(
    open_bus: OpenBus, unique: Unique
) -> None:
    """expected=None: it waits the whole timeout and returns every reply."""
    question = f"{unique('t')}.ask"
    await _responders(await open_bus(), question, unique, 3)
    asker = await open_bus()
    timeout_s = 1.0

    started = time.monotonic()
    replies = await asker.publish_and_wait(question, {"x": 1}, timeout_s=timeout_s)
    elapsed = time.monotonic() - started

    assert sorted(r.data["responder"] for r in replies) == [0, 1, 2]
    assert timeout_s - 0.05 <= elapsed < timeout_s + 1.0


async def test_publish_and_wait_with_silent_subscribers_returns_nothing_at_the_timeout(
    open_bus: OpenBus, unique: Unique
) -> None:
    """A bound queue whose handler returns None: [] once the timeout has passed, not later."""
    question = f"{unique('t')}.ask"
    heard = asyncio.Event()

    async def silent() -> None:
        heard.set()

    await (await open_bus()).subscribe(question, silent, group=unique("silent"))
    asker = await open_bus()
    timeout_s = 1.0

    started = time.monotonic()
    replies = await asker.publish_and_wait(question, timeout_s=timeout_s, expected=1)
    elapsed = time.monotonic() - started

    assert replies == []
    assert heard.is_set(), "the subscriber never got the question"
    assert timeout_s - 0.05 <= elapsed < timeout_s + 1.0


async def test_publish_and_wait_with_no_queue_bound_returns_at_once(
    open_bus: OpenBus, unique: Unique
) -> None:
    """Nobody bound for the type: [] immediately (the broker returns it), not at the timeout."""
    asker = await open_bus()

    started = time.monotonic()
    replies = await asker.publish_and_wait(f"{unique('t')}.nobody", timeout_s=10)
    elapsed = time.monotonic() - started

    assert replies == []
    assert elapsed < 2, f"took {elapsed:.2f}s"


async def test_publish_and_wait_gets_an_error_reply_and_the_question_is_not_dead_lettered(
    connect: Connect, open_bus: OpenBus, unique: Unique
) -> None:
    """A responder that raises answers INTERNAL_ERROR; the question is acked, not dead."""
    prefix, group = unique("t"), unique("failing")
    transport = await connect()
    responder = await open_bus(transport, prefetch=1)  # settles in order
    calls: list[dict[str, Any]] = []

    async def explode(payload: dict[str, Any]) -> None:
        calls.append(payload)
        raise RuntimeError("responder failed")

    await responder.subscribe(f"{prefix}.*", explode, group=group)
    asker = await open_bus()

    replies = await asker.publish_and_wait(f"{prefix}.ask", {"q": 1}, timeout_s=10, expected=1)
    assert len(replies) == 1
    assert replies[0].ok is False
    assert replies[0].code == ErrorCode.INTERNAL_ERROR
    assert replies[0].error is not None
    assert "responder failed" not in replies[0].error.message  # details stay in the log

    # Control: the same failure on a plain event *is* dead-lettered. With prefetch 1
    # it is handled after the question was settled, so one dead message = the control.
    dead = TOPOLOGY.group_dead_letter_queue(group)
    await asker.publish(f"{prefix}.plain", {"q": 2})
    await wait_until(
        lambda: holds_at_least(transport, dead, 1), what="the control to be dead-lettered"
    )
    assert calls == [{"q": 1}, {"q": 2}]
    assert await queue_depth(transport, dead) == 1
    assert await queue_depth(transport, TOPOLOGY.group_queue(group)) == 0


# -- 6, 7. failures are dead-lettered once, never looped -----------------------------------


async def test_bad_payloads_are_dead_lettered_once_and_never_reach_the_handler(
    connect: Connect, open_bus: OpenBus, unique: Unique
) -> None:
    """Not JSON, a JSON array, a non-JSON content type, a schema failure: each dead once."""
    prefix, group = unique("t"), unique("orders")
    event_type = f"{prefix}.order"
    transport = await connect()
    bus = await open_bus(transport)
    orders: list[Order] = []

    async def take(order: Order) -> None:
        orders.append(order)

    await bus.subscribe(event_type, take, group=group)
    bad = {
        b"{not json": {},
        b"[1, 2, 3]": {},
        b'{"id": 3}': {"content_type": "text/plain"},
        b'{"id": "three"}': {},
        b'{"id": 3, "extra": true}': {},
    }
    good = 0
    await transport.publish(raw_event(event_type, b'{"id": 0}'), timeout_s=10)
    for body, properties in bad.items():
        await transport.publish(raw_event(event_type, body, **properties), timeout_s=10)
        good += 1
        await transport.publish(raw_event(event_type, b'{"id": %d}' % good), timeout_s=10)

    dead = TOPOLOGY.group_dead_letter_queue(group)
    await wait_until(lambda: len(orders) == good + 1, what="the good events")
    await wait_until(lambda: holds_at_least(transport, dead, len(bad)), what="the bad events")
    assert sorted(o.id for o in orders) == list(range(good + 1))

    dead_letters: list[Envelope] = []

    async def collect(delivery: Delivery) -> None:
        dead_letters.append(delivery.envelope)
        await delivery.ack()

    consumer = await transport.consume(dead, collect, prefetch=10)
    try:
        await wait_until(lambda: len(dead_letters) >= len(bad), what="the dead letters")
    finally:
        await consumer.cancel()
    assert sorted(e.body for e in dead_letters) == sorted(bad)
    # Dead-lettered through events.dlx with the group as routing key.
    assert {(e.exchange, e.routing_key) for e in dead_letters} == {
        (TOPOLOGY.events_dead_letter_exchange, group)
    }
    # Nothing went back to the group's queue: the bad events did not loop.
    assert await queue_depth(transport, TOPOLOGY.group_queue(group)) == 0
    assert len(orders) == good + 1


@pytest.mark.parametrize("failure", ["raises", "times out"])
async def test_a_failing_handler_dead_letters_the_event_once(
    connect: Connect, open_bus: OpenBus, unique: Unique, failure: str
) -> None:
    """A handler that raises or overruns: its event goes to events.<group>.dead, once."""
    prefix, group = unique("t"), unique("fragile")
    transport = await connect()
    bus = await open_bus(transport, prefetch=1, handler_timeout_s=0.2)
    calls: list[Event] = []
    never = asyncio.Event()

    async def fragile(event: Event) -> None:
        calls.append(event)
        if event.payload.get("fail"):
            if failure == "raises":
                raise RuntimeError("handler failed")
            await never.wait()  # cancelled by the bus's handler timeout

    await bus.subscribe(f"{prefix}.*", fragile, group=group)
    bad_id = await bus.publish(f"{prefix}.bad", {"fail": True})
    await bus.publish(f"{prefix}.good", {"fail": False})

    dead = TOPOLOGY.group_dead_letter_queue(group)
    await wait_until(lambda: len(calls) == 2, what="both events to be handled")
    await wait_until(lambda: holds_at_least(transport, dead, 1), what="the dead letter")
    # The control (good) was delivered after the failed one was settled (prefetch 1):
    # had the failure been requeued, it would have come back before or after it.
    await bus.publish(f"{prefix}.good", {"fail": False})
    await wait_until(lambda: len(calls) >= 3, what="the second control")
    assert [(e.type, e.redelivered) for e in calls] == [
        (f"{prefix}.bad", False),
        (f"{prefix}.good", False),
        (f"{prefix}.good", False),
    ]
    assert calls[0].id == bad_id
    assert await queue_depth(transport, dead) == 1
    assert await queue_depth(transport, TOPOLOGY.group_queue(group)) == 0


# -- 8. a group's queue outlives its consumers ------------------------------------------------


async def test_group_events_queue_while_unsubscribed_and_arrive_on_resubscribe(
    connect: Connect, open_bus: OpenBus, unique: Unique
) -> None:
    """Unsubscribing a group's last handler stops consuming; later events wait for the group."""
    prefix, group = unique("t"), unique("late")
    queue = TOPOLOGY.group_queue(group)
    transport = await connect()
    bus = await open_bus(transport)
    first = Inbox()
    subscription = await bus.subscribe(f"{prefix}.*", first.handle, group=group)
    assert (await transport.queue_info(queue)).consumers == 1
    await bus.publish(f"{prefix}.one", {"n": 1})
    await wait_until(lambda: len(first.events) == 1, what="the first event")

    await bus.unsubscribe(subscription)
    assert bus.consumers == 0
    assert (await transport.queue_info(queue)).consumers == 0
    for n in (2, 3, 4):
        await bus.publish(f"{prefix}.later", {"n": n})
        assert await queue_depth(transport, queue) == n - 1  # confirmed = enqueued
    assert len(first.events) == 1

    second = Inbox()
    await bus.subscribe(f"{prefix}.*", second.handle, group=group)
    await wait_until(lambda: len(second.events) == 3, what="the queued events")
    assert sorted(p["n"] for p in second.payloads) == [2, 3, 4]
    assert len(first.events) == 1
    await wait_until(lambda: holds_at_most(transport, queue, 0), what="the queue to drain")


# -- 9. a plain AMQP publisher ----------------------------------------------------------------


def plain_publish(url: str, routing_key: str, body: bytes, message_id: str) -> None:
    """Publish one event with pika (no library code), confirmed by the broker."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            exchange="events",
            routing_key=routing_key,
            body=body,
            properties=pika.BasicProperties(
                content_type="application/json", message_id=message_id, delivery_mode=2
            ),
            mandatory=True,
        )
    finally:
        connection.close()


async def test_an_event_from_a_plain_amqp_client_reaches_a_group_handler(
    open_bus: OpenBus, unique: Unique, amqp_url: str
) -> None:
    """pika publishes to 'events' with routing key = type: the handler gets type, id, payload."""
    event_type = f"{unique('t')}.shipped"
    bus = await open_bus()
    inbox = Inbox()
    await bus.subscribe(event_type, inbox.handle, group=unique("shipping"))
    message_id = uuid.uuid4().hex
    payload = {"order": 42, "items": ["a", "b"], "note": "plain client"}

    await asyncio.to_thread(
        plain_publish, amqp_url, event_type, json.dumps(payload).encode(), message_id
    )

    await wait_until(lambda: len(inbox.events) == 1, what="the plain client's event")
    (event,) = inbox.events
    assert event.type == event_type
    assert event.id == message_id
    assert event.payload == payload
    assert event.reply_to is None
    assert event.redelivered is False


# -- 10, 11. agents and the worker -------------------------------------------------------------


async def test_worker_runs_grouped_default_group_and_broadcast_event_handlers(
    connect: Connect,
    unique: Unique,
    broker_admin: BrokerAdmin,
    module_vhost: str,
) -> None:
    """@on_event with group=, the default group (agent name) and broadcast all run in a worker."""
    prefix, shared_group = unique("t"), unique("shared")

    class Listener(Agent):
        def __init__(self, *, name: str) -> None:
            super().__init__(name=name)
            self.seen: dict[str, list[Any]] = {"grouped": [], "own": [], "broadcast": []}

        @on_event(f"{prefix}.grouped", group=shared_group)
        async def grouped(self, event: Event) -> None:
            self.seen["grouped"].append(event.type)

        @on_event(f"{prefix}.own.*")
        async def own(self, payload: dict[str, Any]) -> None:
            self.seen["own"].append(payload)

        @on_event(f"{prefix}.#", broadcast=True)
        async def everything(self, order: Order) -> None:
            self.seen["broadcast"].append(order.id)

    agent = Listener(name=unique("listener"))
    transport = await connect()
    worker = Worker(transport, [agent])
    grouped_queue = TOPOLOGY.group_queue(shared_group)
    default_queue = TOPOLOGY.group_queue(agent.name)  # the default group: the agent's name
    try:
        await worker.start()
        readiness = [worker.is_ready]
        assert worker.events.consumers == 3

        # Earlier tests' private queues died with their connections: the one left is ours.
        listing = await queues(broker_admin, module_vhost)
        private = [q for q, row in listing.items() if q.startswith("amq.gen-") and row.consumers]
        assert len(private) == 1, private
        for queue in (grouped_queue, default_queue, private[0]):
            assert listing[queue].consumers == 1, queue

        await worker.events.publish(f"{prefix}.grouped", {"id": 1})
        await agent.emit(f"{prefix}.own.thing", {"id": 2})  # through the worker's bus
        await wait_until(
            lambda: (
                bool(agent.seen["grouped"] and agent.seen["own"])
                and len(agent.seen["broadcast"]) == 2
            ),
            what="every handler to run",
        )
        assert agent.seen["grouped"] == [f"{prefix}.grouped"]
        assert agent.seen["own"] == [{"id": 2}]
        assert sorted(agent.seen["broadcast"]) == [1, 2]
    finally:
        await worker.stop()

    readiness.append(worker.is_ready)
    assert readiness == [True, False]
    assert worker.events.consumers == 0
    for queue in (grouped_queue, default_queue, TOPOLOGY.agent_queue(agent.name)):
        assert (await transport.queue_info(queue)).consumers == 0, queue
    with pytest.raises(QueueNotFoundError):  # exclusive, auto-delete: gone with its consumer
        await transport.queue_info(private[0])


async def test_example_app_audits_task_events_end_to_end(
    broker_url: str, fresh_vhost: str, connect: Connect
) -> None:
    """TaskManager emits task.created/completed; AuditAgent records both for the task."""
    transport = await connect(url_for_vhost(broker_url, fresh_vhost))  # fixed names: own vhost
    worker = Worker(transport, app())
    try:
        await worker.start()
        async with RpcClient(transport) as client:
            task = await client.call(
                "task_manager", "task_add", {"title": "write tests"}, timeout_s=10
            )
            done = await client.call(
                "task_manager", "task_complete", {"id": task["id"]}, timeout_s=10
            )
            assert done == {"id": task["id"], "title": "write tests", "completed": True}

            entries: list[dict[str, Any]] = []

            async def audited() -> bool:
                log = await client.call("audit", "audit_log", timeout_s=10)
                entries[:] = log["entries"]
                return len(entries) >= 2

            await wait_until(audited, what="the audit log to list both events")
    finally:
        await worker.stop()

    assert [(e["type"], e["task_id"]) for e in entries] in (
        [("task.created", task["id"]), ("task.completed", task["id"])],
        [("task.completed", task["id"]), ("task.created", task["id"])],
    )
    assert len({e["event_id"] for e in entries}) == 2


# -- 12. what an event looks like on the wire ----------------------------------------------------


async def test_events_are_persistent_confirmed_json_with_type_id_and_timestamp(
    connect: Connect, open_bus: OpenBus, unique: Unique
) -> None:
    """A published event is persistent JSON with type, message_id, timestamp; confirmed = queued."""
    event_type = f"{unique('t')}.wire"
    transport = await connect()
    bus = await open_bus(transport)
    queue = await transport.declare_queue(
        QueueSpec(name="", durable=False, exclusive=True, auto_delete=True)
    )
    await transport.bind_queue(queue, TOPOLOGY.events_exchange, event_type)

    before = int(time.time())
    event_id = await bus.publish(event_type, {"answer": 42})
    after = int(time.time())
    assert await queue_depth(transport, queue) == 1  # confirmed before publish returned

    received: list[Envelope] = []

    async def keep(delivery: Delivery) -> None:
        received.append(delivery.envelope)
        await delivery.ack()

    consumer = await transport.consume(queue, keep, prefetch=1)
    try:
        await wait_until(lambda: len(received) == 1, what="the raw event")
    finally:
        await consumer.cancel()
    (envelope,) = received
    assert envelope.persistent is True  # delivery_mode 2
    assert envelope.content_type == CONTENT_TYPE_JSON
    assert envelope.type == event_type
    assert envelope.exchange == TOPOLOGY.events_exchange
    assert envelope.routing_key == event_type
    assert envelope.message_id == event_id
    assert event_id
    assert envelope.timestamp is not None
    assert before <= envelope.timestamp <= after
    assert envelope.reply_to is None
    assert json.loads(envelope.body) == {"answer": 42}


# -- regressions: bugs these tests found, now fixed ---------------------------------------------


def channels_in(admin: BrokerAdmin, vhost: str) -> int:
    """Open AMQP channels on ``vhost``."""
    out = admin.run("list_channels", "--no-table-headers", "vhost")
    return sum(1 for line in out.splitlines() if line.strip() == vhost)


async def test_subscribe_unsubscribe_cycles_do_not_leak_channels(
    open_bus: OpenBus, unique: Unique, broker_admin: BrokerAdmin, module_vhost: str
) -> None:
    """Subscribing and unsubscribing repeatedly leaves the broker's channel count flat."""
    prefix, cycles = unique("t"), 10
    bus = await open_bus()

    async def ignore() -> None:
        return None

    before = await asyncio.to_thread(channels_in, broker_admin, module_vhost)
    for n in range(cycles):
        private = await bus.subscribe(f"{prefix}.*", ignore)
        await bus.unsubscribe(private)
        grouped = await bus.subscribe(f"{prefix}.*", ignore, group=f"{prefix}-{n}")
        await bus.unsubscribe(grouped)
    assert bus.consumers == 0

    async def flat() -> bool:
        return await asyncio.to_thread(channels_in, broker_admin, module_vhost) <= before + 1

    await wait_until(flat, timeout_s=1, what=f"the channels of {2 * cycles} cycles to close")


async def test_private_subscribe_works_after_stop_consuming(
    open_bus: OpenBus, unique: Unique
) -> None:
    """stop_consuming() then subscribe() without a group consumes again (as groups do)."""
    prefix = unique("t")
    bus = await open_bus()
    publisher = await open_bus()
    before, after = Inbox(), Inbox()
    await bus.subscribe(f"{prefix}.before", before.handle)
    await bus.stop_consuming()

    await bus.subscribe(f"{prefix}.after", after.handle)
    await publisher.publish(f"{prefix}.after")
    await wait_until(lambda: len(after.events) == 1, what="the event after resubscribing")


async def test_a_dead_letter_moved_back_to_its_group_queue_is_handled(
    connect: Connect, open_bus: OpenBus, unique: Unique
) -> None:
    """Replaying events.<group>.dead into events.<group> runs the handler again."""
    prefix, group = unique("t"), unique("replay")
    queue, dead = TOPOLOGY.group_queue(group), TOPOLOGY.group_dead_letter_queue(group)
    transport = await connect()
    bus = await open_bus(transport)
    attempts: list[Event] = []

    async def flaky(event: Event) -> None:
        attempts.append(event)
        if len(attempts) == 1:
            raise RuntimeError("the first attempt fails")

    await bus.subscribe(f"{prefix}.*", flaky, group=group)
    event_id = await bus.publish(f"{prefix}.paid", {"n": 1})
    await wait_until(lambda: holds_at_least(transport, dead, 1), what="the dead letter")

    letters: list[Envelope] = []

    async def take(delivery: Delivery) -> None:
        letters.append(delivery.envelope)
        await delivery.ack()

    consumer = await transport.consume(dead, take, prefetch=1)
    try:
        await wait_until(lambda: len(letters) == 1, what="the dead letter to be read")
    finally:
        await consumer.cancel()
    (letter,) = letters
    assert letter.type == f"{prefix}.paid"
    assert letter.message_id == event_id
    # What RabbitMQ's shovel ("move messages") does: the default exchange, key = queue.
    letter.exchange, letter.routing_key, letter.headers = "", queue, None
    await transport.publish(letter, timeout_s=10)

    async def settled() -> bool:
        return len(attempts) == 2 or await queue_depth(transport, dead) == 1

    await wait_until(settled, what="the replayed event to be handled or dead-lettered")
    assert [e.id for e in attempts] == [event_id, event_id]
    assert await queue_depth(transport, dead) == 0
