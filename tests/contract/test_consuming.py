"""Consuming: priority order, prefetch, round-robin, no-ack, settlement, dead-lettering,
per-message TTL."""

from __future__ import annotations

import asyncio

import pytest

from amqp_agents.transport.base import Delivery, ExchangeKind, Transport
from tests.contract.conftest import Backend, bodies


async def dead_letter_setup(
    backend: Backend, transport: Transport, *, routing_key: str | None = "dead"
) -> tuple[str, str, str]:
    """A queue dead-lettering to a direct exchange: (queue, exchange, dead-letter queue)."""
    dlx = backend.unique("dlx")
    await transport.declare_exchange(dlx, ExchangeKind.DIRECT, durable=False)
    dead = await backend.queue(transport, "dead")
    arguments: dict[str, str | int | float | bool | bytes | None] = {"x-dead-letter-exchange": dlx}
    if routing_key is not None:
        arguments["x-dead-letter-routing-key"] = routing_key
    source = await backend.queue(transport, "source", arguments=arguments)
    await transport.bind_queue(dead, dlx, routing_key or source)
    return source, dlx, dead


# -- order and flow ------------------------------------------------------------------


async def test_priority_queue_delivers_higher_first_fifo_within_a_priority(
    backend: Backend, transport: Transport
) -> None:
    """Above the max counts as the max, no priority as 0; FIFO within a level."""
    queue = await backend.queue(transport, arguments={"x-max-priority": 9})
    published = [
        ("none-1", None),
        ("5-1", 5),
        ("0-1", 0),
        ("9-1", 9),
        ("20-1", 20),
        ("5-2", 5),
        ("9-2", 9),
        ("none-2", None),
    ]
    for body, priority in published:
        await backend.publish(transport, body.encode(), routing_key=queue, priority=priority)
    inbox = await backend.consume(transport, queue, prefetch=1)
    order = []
    for _ in published:
        delivery = await inbox.next()
        order.append(delivery.envelope.body.decode())
        await delivery.ack()
    assert order == ["9-1", "20-1", "9-2", "5-1", "5-2", "none-1", "0-1", "none-2"]


async def test_plain_queue_ignores_priorities(backend: Backend, transport: Transport) -> None:
    """Without x-max-priority delivery is FIFO whatever the priority."""
    queue = await backend.queue(transport)
    for n, priority in enumerate([0, 9, 5]):
        await backend.publish(transport, str(n).encode(), routing_key=queue, priority=priority)
    inbox = await backend.consume(transport, queue)
    assert bodies(await inbox.take(3)) == [b"0", b"1", b"2"]


async def test_prefetch_bounds_unacked_deliveries(backend: Backend, transport: Transport) -> None:
    """With prefetch N and N unacked, the next message waits for an ack."""
    queue = await backend.queue(transport)
    for n in range(4):
        await backend.publish(transport, str(n).encode(), routing_key=queue)
    inbox = await backend.consume(transport, queue, prefetch=2)
    first, second = await inbox.take(2)
    await inbox.expect_nothing()
    assert await backend.ready(transport, queue) == 2
    await first.ack()
    assert bodies([await inbox.next()]) == [b"2"]
    await inbox.expect_nothing()
    await second.nack(requeue=False)
    assert bodies([await inbox.next()]) == [b"3"]


async def test_two_consumers_of_one_queue_take_turns(
    backend: Backend, transport: Transport
) -> None:
    """Round-robin: consecutive messages alternate between idle consumers."""
    queue = await backend.queue(transport)
    left = await backend.consume(transport, queue, prefetch=10)
    right = await backend.consume(transport, queue, prefetch=10)
    for n in range(6):
        await backend.publish(transport, str(n).encode(), routing_key=queue)
    shares = {frozenset(bodies(await inbox.take(3))) for inbox in (left, right)}
    assert shares == {frozenset({b"0", b"2", b"4"}), frozenset({b"1", b"3", b"5"})}


async def test_no_ack_consumer_gets_messages_without_settling(
    backend: Backend, transport: Transport
) -> None:
    """no_ack: prefetch does not hold deliveries back and closing requeues nothing."""
    queue = await backend.queue(transport)
    for n in range(3):
        await backend.publish(transport, str(n).encode(), routing_key=queue)
    inbox = await backend.consume(transport, queue, prefetch=1, no_ack=True)
    deliveries = await inbox.take(3)
    assert bodies(deliveries) == [b"0", b"1", b"2"]
    await deliveries[0].ack()
    await deliveries[1].nack(requeue=True)
    await deliveries[2].reject()
    await inbox.close()
    assert await backend.ready(transport, queue) == 0


async def test_a_suspending_no_ack_handler_finishes_and_is_cancelled_by_close(
    backend: Backend, transport: Transport
) -> None:
    """A no-ack handler that waits mid-way finishes once it can (each in its own
    task, so one waiting holds up no other), and closing the consumer cancels the
    handlers still waiting."""
    queue = await backend.queue(transport)
    release = asyncio.Event()
    started: list[bytes] = []
    finished: list[bytes] = []
    cancelled: list[bytes] = []

    async def handler(delivery: Delivery) -> None:
        body = delivery.envelope.body
        started.append(body)
        try:
            if body != b"quick":
                await release.wait()
        except asyncio.CancelledError:
            cancelled.append(body)
            raise
        finished.append(body)

    consumer = await transport.consume(queue, handler, prefetch=0, no_ack=True)
    await backend.publish(transport, b"slow", routing_key=queue)
    await backend.publish(transport, b"quick", routing_key=queue)
    await backend.wait_until(lambda: finished == [b"quick"], "the quick one")
    release.set()
    await backend.wait_until(lambda: b"slow" in finished, "the slow one")
    release.clear()
    await backend.publish(transport, b"stuck", routing_key=queue)
    await backend.wait_until(lambda: b"stuck" in started, "the stuck one starts")
    await consumer.close()
    await backend.wait_until(lambda: cancelled == [b"stuck"], "closing cancels it")
    assert b"stuck" not in finished


async def test_requeued_messages_return_to_their_original_positions(
    backend: Backend, transport: Transport
) -> None:
    """Requeues in any order restore publish order (RabbitMQ keeps the position)."""
    queue = await backend.queue(transport)
    for body in (b"a", b"b", b"c"):
        await backend.publish(transport, body, routing_key=queue)
    inbox = await backend.consume(transport, queue, prefetch=2)
    a, b = await inbox.take(2)
    assert inbox.consumer is not None
    await inbox.consumer.cancel()
    await a.nack(requeue=True)
    await b.nack(requeue=True)
    again = await (await backend.consume(transport, queue)).take(3)
    assert [(d.envelope.body, d.envelope.redelivered) for d in again] == [
        (b"a", True),
        (b"b", True),
        (b"c", False),
    ]


# -- settlement ----------------------------------------------------------------------


async def test_ack_removes_the_message(backend: Backend, transport: Transport) -> None:
    """An acked message does not come back when the consumer closes."""
    queue = await backend.queue(transport)
    await backend.publish(transport, b"x", routing_key=queue)
    inbox = await backend.consume(transport, queue)
    await (await inbox.next()).ack()
    await inbox.close()
    assert await backend.ready(transport, queue) == 0


async def test_closing_a_consumer_requeues_its_unsettled_deliveries(
    backend: Backend, transport: Transport
) -> None:
    """Unsettled deliveries return in order, marked redelivered."""
    queue = await backend.queue(transport)
    for n in range(2):
        await backend.publish(transport, str(n).encode(), routing_key=queue)
    inbox = await backend.consume(transport, queue)
    first = await inbox.take(2)
    assert [d.envelope.redelivered for d in first] == [False, False]
    await inbox.close()
    assert await backend.ready(transport, queue) == 2
    again = await (await backend.consume(transport, queue)).take(2)
    assert [(d.envelope.body, d.envelope.redelivered) for d in again] == [
        (b"0", True),
        (b"1", True),
    ]


async def test_nack_with_requeue_redelivers_marked_redelivered(
    backend: Backend, transport: Transport
) -> None:
    """nack(requeue=True) puts it back at the head; it returns with redelivered=True."""
    queue = await backend.queue(transport)
    for body in (b"first", b"second"):
        await backend.publish(transport, body, routing_key=queue)
    inbox = await backend.consume(transport, queue, prefetch=1)
    delivery = await inbox.next()
    assert (delivery.envelope.body, delivery.envelope.redelivered) == (b"first", False)
    await delivery.nack(requeue=True)
    again = await inbox.next()
    assert (again.envelope.body, again.envelope.redelivered) == (b"first", True)


@pytest.mark.parametrize("how", ["nack", "reject"])
async def test_refusing_without_a_dead_letter_exchange_drops_the_message(
    backend: Backend, transport: Transport, how: str
) -> None:
    """nack(requeue=False) and reject() discard the message."""
    queue = await backend.queue(transport)
    await backend.publish(transport, b"x", routing_key=queue)
    inbox = await backend.consume(transport, queue)
    delivery = await inbox.next()
    await (delivery.nack(requeue=False) if how == "nack" else delivery.reject())
    await inbox.close()
    assert await backend.ready(transport, queue) == 0


@pytest.mark.parametrize("how", ["nack", "reject"])
async def test_refused_message_is_dead_lettered_with_body_and_properties(
    backend: Backend, transport: Transport, how: str
) -> None:
    """Dead letter: the DLX and x-dead-letter-routing-key, original properties kept."""
    source, dlx, dead = await dead_letter_setup(backend, transport)
    headers = {"tenant": "acme", "attempt": 3}
    await backend.publish(
        transport,
        b"payload",
        routing_key=source,
        headers=headers,
        message_id="m-1",
        correlation_id="c-1",
        content_type="application/json",
        type="task.created",
        priority=4,
        timestamp=1_700_000_000,
        reply_to="replies",
    )
    inbox = await backend.consume(transport, source)
    delivery = await inbox.next()
    await (delivery.nack(requeue=False) if how == "nack" else delivery.reject())
    letter = (await (await backend.consume(transport, dead)).next()).envelope
    assert letter.body == b"payload"
    assert (letter.exchange, letter.routing_key) == (dlx, "dead")
    original = delivery.envelope
    for name in (
        "message_id",
        "correlation_id",
        "content_type",
        "type",
        "priority",
        "timestamp",
        "reply_to",
        "persistent",
    ):
        assert getattr(letter, name) == getattr(original, name), name
    assert letter.headers is not None
    assert {k: letter.headers[k] for k in headers} == headers
    assert letter.headers["x-first-death-reason"] == "rejected"
    assert letter.headers["x-first-death-queue"] == source
    assert await backend.ready(transport, source) == 0


async def test_dead_letter_keeps_the_routing_key_without_a_dead_letter_key(
    backend: Backend, transport: Transport
) -> None:
    """Without x-dead-letter-routing-key the original routing key is used."""
    source, _dlx, dead = await dead_letter_setup(backend, transport, routing_key=None)
    await backend.publish(transport, b"x", routing_key=source)
    delivery = await (await backend.consume(transport, source)).next()
    await delivery.reject()
    letter = (await (await backend.consume(transport, dead)).next()).envelope
    assert letter.routing_key == source


@pytest.mark.parametrize(
    ("first", "second"),
    [("ack", "ack"), ("ack", "nack"), ("nack", "ack"), ("reject", "reject"), ("ack", "reject")],
)
async def test_settling_twice_is_harmless(
    backend: Backend, transport: Transport, first: str, second: str
) -> None:
    """The second settlement is ignored and the consumer keeps receiving."""
    queue = await backend.queue(transport)
    await backend.publish(transport, b"1", routing_key=queue)
    inbox = await backend.consume(transport, queue, prefetch=1)
    delivery = await inbox.next()
    for how in (first, second):
        await (delivery.nack(requeue=True) if how == "nack" else getattr(delivery, how)())
    await backend.publish(transport, b"2", routing_key=queue)
    following = await inbox.next()
    if first == "nack":  # requeued: the same message comes back first
        assert (following.envelope.body, following.envelope.redelivered) == (b"1", True)
        await following.ack()
        following = await inbox.next()
    assert following.envelope.body == b"2"
    await following.ack()
    await inbox.expect_nothing()


async def test_a_cancelled_consumer_can_still_settle_its_deliveries(
    backend: Backend, transport: Transport
) -> None:
    """After cancel() acks still count (graceful stop): nothing is requeued on close."""
    queue = await backend.queue(transport)
    await backend.publish(transport, b"x", routing_key=queue)
    inbox = await backend.consume(transport, queue)
    delivery = await inbox.next()
    assert inbox.consumer is not None
    await inbox.consumer.cancel()
    assert (await transport.queue_info(queue)).consumers == 0
    await delivery.ack()
    await inbox.close()
    assert await backend.ready(transport, queue) == 0


async def test_a_cancelled_consumer_gets_no_new_messages(
    backend: Backend, transport: Transport
) -> None:
    """After cancel() new messages stay queued."""
    queue = await backend.queue(transport)
    inbox = await backend.consume(transport, queue)
    await backend.publish(transport, b"before", routing_key=queue)
    assert bodies([await inbox.next()]) == [b"before"]
    assert inbox.consumer is not None
    await inbox.consumer.cancel()
    await backend.publish(transport, b"after", routing_key=queue)
    await inbox.expect_nothing()
    assert await backend.ready(transport, queue) == 1


# -- per-message TTL -----------------------------------------------------------------


async def test_a_message_expires_while_queued_and_is_never_delivered(
    backend: Backend, transport: Transport
) -> None:
    """An expired head leaves the queue; a consumer then gets only the live message."""
    queue = await backend.queue(transport)
    await backend.publish(transport, b"expiring", routing_key=queue, expiration_ms=50)
    await backend.wait_until(
        lambda: _empty(backend, transport, queue), "the expired message left the queue"
    )
    await backend.publish(transport, b"live", routing_key=queue)
    inbox = await backend.consume(transport, queue)
    assert bodies([await inbox.next()]) == [b"live"]
    await inbox.expect_nothing()


async def test_a_zero_ttl_message_reaches_a_waiting_consumer(
    backend: Backend, transport: Transport
) -> None:
    """expiration 0: delivered if a consumer can take it at once, else dropped."""
    queue = await backend.queue(transport)
    await backend.publish(transport, b"dropped", routing_key=queue, expiration_ms=0)
    await backend.wait_until(lambda: _empty(backend, transport, queue), "zero-TTL dropped")
    inbox = await backend.consume(transport, queue)
    await backend.publish(transport, b"taken", routing_key=queue, expiration_ms=0)
    assert bodies([await inbox.next()]) == [b"taken"]
    await inbox.expect_nothing()


async def _empty(backend: Backend, transport: Transport, queue: str) -> bool:
    return await backend.ready(transport, queue) == 0


async def test_an_expired_message_behind_a_live_head_waits_for_the_head(
    backend: Backend, transport: Transport
) -> None:
    """Per-message TTL acts at the head only: it is counted until then, never delivered."""
    queue = await backend.queue(transport)
    await backend.publish(transport, b"head", routing_key=queue, expiration_ms=200)
    await backend.publish(transport, b"live", routing_key=queue)
    await backend.publish(transport, b"behind", routing_key=queue, expiration_ms=50)
    await backend.wait_until(
        lambda: _fewer_than(backend, transport, queue, 3), "the expired head left"
    )
    assert await backend.ready(transport, queue) == 2  # "behind" expired, still counted
    inbox = await backend.consume(transport, queue)
    assert bodies([await inbox.next()]) == [b"live"]
    await inbox.expect_nothing()
    assert await backend.ready(transport, queue) == 0


async def _fewer_than(backend: Backend, transport: Transport, queue: str, count: int) -> bool:
    return await backend.ready(transport, queue) < count


async def test_an_expired_message_is_dead_lettered_on_its_own(
    backend: Backend, transport: Transport
) -> None:
    """With a DLX an expired head is dead-lettered by the broker, untouched by clients."""
    source, dlx, dead = await dead_letter_setup(backend, transport)
    await backend.publish(
        transport, b"late", routing_key=source, expiration_ms=50, headers={"k": "v"}
    )
    letter = (await (await backend.consume(transport, dead)).next()).envelope
    assert (letter.body, letter.exchange, letter.routing_key) == (b"late", dlx, "dead")
    assert letter.expiration_ms is None  # so it does not expire again
    assert letter.headers is not None
    assert letter.headers["k"] == "v"
    assert letter.headers["x-first-death-reason"] == "expired"
