"""Routing: exchange kinds, the default exchange, mandatory publishes, bindings."""

from __future__ import annotations

import pytest

from amqp_agents.errors import QueueNotFoundError, UnroutableError
from amqp_agents.models.envelope import Envelope
from amqp_agents.transport.base import ExchangeKind, Transport
from tests.contract.conftest import PUBLISH_TIMEOUT_S, Backend, bodies


async def test_direct_exchange_routes_on_the_exact_key(
    backend: Backend, transport: Transport
) -> None:
    """A direct exchange delivers to the queues bound with exactly the routing key."""
    exchange = backend.unique("direct")
    await transport.declare_exchange(exchange, ExchangeKind.DIRECT, durable=False)
    red, blue = await backend.queue(transport), await backend.queue(transport)
    await transport.bind_queue(red, exchange, "red")
    await transport.bind_queue(blue, exchange, "blue")
    for key in ("red", "red.x", "RED", "blue", "red"):
        await backend.publish(transport, key.encode(), exchange=exchange, routing_key=key)
    assert await backend.ready(transport, red) == 2
    assert await backend.ready(transport, blue) == 1


TOPIC_CASES = {
    "a.*": {"a.b", "a."},
    "a.#": {"a", "a.b", "a.b.c", "a."},
    "*.b.*": {"a.b.c"},
    "#.c": {"c", "a.b.c", "x.c", "b.c"},
    "#": {"", "a", "a.b", "a.b.c", "c", "x.c", "a.", "b.c"},
    "*": {"a", "c"},
    "a.*.c": {"a.b.c"},
}
TOPIC_KEYS = ("", "a", "a.b", "a.b.c", "c", "x.c", "a.", "b.c")


async def test_topic_exchange_matches_star_and_hash_like_rabbitmq(
    backend: Backend, transport: Transport
) -> None:
    """``*`` matches one word (possibly empty), ``#`` zero or more, ``""`` has no words."""
    exchange = backend.unique("topic")
    await transport.declare_exchange(exchange, ExchangeKind.TOPIC, durable=False)
    queues = {}
    for pattern in TOPIC_CASES:
        queues[pattern] = await backend.queue(transport)
        await transport.bind_queue(queues[pattern], exchange, pattern)
    for key in TOPIC_KEYS:
        await backend.publish(transport, key.encode(), exchange=exchange, routing_key=key)
    routed = {}
    for pattern, queue in queues.items():
        count = await backend.ready(transport, queue)
        inbox = await backend.consume(transport, queue, no_ack=True)
        routed[pattern] = {d.envelope.routing_key for d in await inbox.take(count)}
    assert routed == TOPIC_CASES


async def test_fanout_exchange_routes_to_every_bound_queue(
    backend: Backend, transport: Transport
) -> None:
    """A fanout exchange ignores the routing key."""
    exchange = backend.unique("fanout")
    await transport.declare_exchange(exchange, ExchangeKind.FANOUT, durable=False)
    first, second = await backend.queue(transport), await backend.queue(transport)
    await transport.bind_queue(first, exchange, "")
    await transport.bind_queue(second, exchange, "whatever")
    await backend.publish(transport, b"x", exchange=exchange, routing_key="any.key")
    assert [await backend.ready(transport, q) for q in (first, second)] == [1, 1]


async def test_default_exchange_routes_to_the_queue_named_by_the_key(
    backend: Backend, transport: Transport
) -> None:
    """Exchange ``""`` delivers to the queue whose name is the routing key."""
    queue = await backend.queue(transport)
    await backend.publish(transport, b"direct to queue", routing_key=queue)
    inbox = await backend.consume(transport, queue)
    delivery = await inbox.next()
    assert delivery.envelope.body == b"direct to queue"
    assert (delivery.envelope.exchange, delivery.envelope.routing_key) == ("", queue)


async def test_publish_to_a_missing_exchange_raises_and_the_transport_keeps_working(
    backend: Backend, transport: Transport
) -> None:
    """QueueNotFoundError for an unknown exchange; the next publish still works."""
    with pytest.raises(QueueNotFoundError):
        await backend.publish(transport, b"lost", exchange=backend.unique("nope"), routing_key="k")
    queue = await backend.queue(transport)
    await backend.publish(transport, b"after", routing_key=queue)
    assert bodies(await (await backend.consume(transport, queue)).take(1)) == [b"after"]


async def test_an_unconfirmed_publish_to_a_missing_exchange_does_not_raise(
    backend: Backend, transport: Transport
) -> None:
    """Without a confirm nothing reports the 404: the publish returns, the message is lost."""
    envelope = Envelope(body=b"lost", exchange=backend.unique("nope"), routing_key="k")
    await transport.publish(envelope, confirm=False, timeout_s=PUBLISH_TIMEOUT_S)
    queue = await backend.queue(transport)
    await backend.publish(transport, b"confirmed", routing_key=queue)
    assert await backend.ready(transport, queue) == 1


@pytest.mark.parametrize("missing", ["exchange", "queue"])
async def test_binding_to_something_missing_raises_queue_not_found(
    backend: Backend, transport: Transport, missing: str
) -> None:
    """Binding a missing queue, or to a missing exchange, raises QueueNotFoundError."""
    exchange = backend.unique("direct")
    await transport.declare_exchange(exchange, ExchangeKind.DIRECT, durable=False)
    queue = await backend.queue(transport)
    if missing == "exchange":
        exchange = backend.unique("nope")
    else:
        queue = backend.unique("nope")
    with pytest.raises(QueueNotFoundError):
        await transport.bind_queue(queue, exchange, "k")
    assert await backend.ready(transport, await backend.queue(transport)) == 0


@pytest.mark.parametrize("via", ["exchange", "default exchange"])
async def test_mandatory_publish_matching_no_queue_raises_unroutable(
    backend: Backend, transport: Transport, via: str
) -> None:
    """mandatory=True and no matching queue: UnroutableError naming exchange and key."""
    exchange = ""
    if via == "exchange":
        exchange = backend.unique("direct")
        await transport.declare_exchange(exchange, ExchangeKind.DIRECT, durable=False)
        await transport.bind_queue(await backend.queue(transport), exchange, "bound")
    key = backend.unique("unbound")
    with pytest.raises(UnroutableError) as caught:
        await backend.publish(transport, b"x", exchange=exchange, routing_key=key, mandatory=True)
    assert (caught.value.exchange, caught.value.routing_key) == (exchange, key)


async def test_unroutable_publish_without_mandatory_is_silently_dropped(
    backend: Backend, transport: Transport
) -> None:
    """mandatory=False and no matching queue: no error, and no queue gets it."""
    exchange = backend.unique("direct")
    await transport.declare_exchange(exchange, ExchangeKind.DIRECT, durable=False)
    queue = await backend.queue(transport)
    await transport.bind_queue(queue, exchange, "bound")
    await backend.publish(transport, b"x", exchange=exchange, routing_key="unbound")
    await backend.publish(transport, b"x", routing_key=backend.unique("no-such-queue"))
    assert await backend.ready(transport, queue) == 0


async def test_mandatory_publish_that_routes_succeeds(
    backend: Backend, transport: Transport
) -> None:
    """mandatory=True with a matching queue enqueues normally."""
    queue = await backend.queue(transport)
    await backend.publish(transport, b"x", routing_key=queue, mandatory=True)
    assert await backend.ready(transport, queue) == 1


async def test_unbind_stops_routing(backend: Backend, transport: Transport) -> None:
    """After unbind_queue the exchange no longer routes the key to the queue."""
    exchange = backend.unique("topic")
    await transport.declare_exchange(exchange, ExchangeKind.TOPIC, durable=False)
    queue = await backend.queue(transport)
    await transport.bind_queue(queue, exchange, "a.*")
    await backend.publish(transport, b"1", exchange=exchange, routing_key="a.b")
    await transport.unbind_queue(queue, exchange, "a.*")
    await backend.publish(transport, b"2", exchange=exchange, routing_key="a.b")
    assert await backend.ready(transport, queue) == 1


async def test_unbinding_a_binding_that_does_not_exist_is_a_no_op(
    backend: Backend, transport: Transport
) -> None:
    """unbind_queue of an unknown key leaves the real binding in place."""
    exchange = backend.unique("direct")
    await transport.declare_exchange(exchange, ExchangeKind.DIRECT, durable=False)
    queue = await backend.queue(transport)
    await transport.bind_queue(queue, exchange, "kept")
    await transport.unbind_queue(queue, exchange, "never-bound")
    await backend.publish(transport, b"x", exchange=exchange, routing_key="kept")
    assert await backend.ready(transport, queue) == 1


async def test_one_message_reaches_a_queue_once_even_if_bound_twice(
    backend: Backend, transport: Transport
) -> None:
    """Two matching bindings of one queue still enqueue one copy."""
    exchange = backend.unique("topic")
    await transport.declare_exchange(exchange, ExchangeKind.TOPIC, durable=False)
    queue = await backend.queue(transport)
    await transport.bind_queue(queue, exchange, "a.*")
    await transport.bind_queue(queue, exchange, "#")
    await backend.publish(transport, b"x", exchange=exchange, routing_key="a.b")
    assert await backend.ready(transport, queue) == 1
