"""The connection: losing it, closing it, and using a transport in the wrong state."""

from __future__ import annotations

import pytest

from amqp_agents.errors import BrokerUnavailableError, LifecycleError, QueueNotFoundError
from amqp_agents.models.envelope import Envelope
from amqp_agents.transport.base import ExchangeKind, QueueSpec, Transport
from tests.contract.conftest import PUBLISH_TIMEOUT_S, Backend


async def queue_is_gone(transport: Transport, queue: str) -> bool:
    try:
        await transport.queue_info(queue)
    except QueueNotFoundError:
        return True
    return False


# -- losing the connection -----------------------------------------------------------


async def test_unacked_deliveries_of_a_lost_connection_go_to_another_consumer(
    backend: Backend,
) -> None:
    """The broker requeues them, marked redelivered, to a consumer on another connection."""
    doomed, survivor = await backend.connect(), await backend.connect()
    queue = await backend.queue(survivor)
    for n in range(2):
        await backend.publish(survivor, str(n).encode(), routing_key=queue)
    held = await (await backend.consume(doomed, queue)).take(2)
    assert [d.envelope.redelivered for d in held] == [False, False]
    inbox = await backend.consume(survivor, queue)
    await backend.lose_connection(doomed)
    again = await inbox.take(2)
    assert [(d.envelope.body, d.envelope.redelivered) for d in again] == [
        (b"0", True),
        (b"1", True),
    ]
    assert (await survivor.queue_info(queue)).consumers == 1


async def test_connection_lost_callbacks_run_exactly_once(backend: Backend) -> None:
    """Every registered callback runs once, also counting a later aclose()."""
    doomed, survivor = await backend.connect(), await backend.connect()
    first: list[BaseException | None] = []
    second: list[BaseException | None] = []
    doomed.on_connection_lost(first.append)
    doomed.on_connection_lost(second.append)
    queue = await backend.queue(survivor)
    await backend.publish(survivor, b"x", routing_key=queue)
    held = await (await backend.consume(doomed, queue)).next()
    inbox = await backend.consume(survivor, queue)
    await backend.lose_connection(doomed)
    await inbox.next()  # the broker has long processed the loss of both links now
    await doomed.aclose()
    assert (len(first), len(second)) == (1, 1)
    await held.ack()


@pytest.mark.parametrize("how", ["ack", "nack", "requeue", "reject"])
async def test_settling_a_delivery_of_a_lost_connection_is_a_no_op(
    backend: Backend, how: str
) -> None:
    """No exception, and the redelivered copy stays with the new consumer."""
    doomed, survivor = await backend.connect(), await backend.connect()
    queue = await backend.queue(survivor)
    await backend.publish(survivor, b"x", routing_key=queue)
    held = await (await backend.consume(doomed, queue)).next()
    inbox = await backend.consume(survivor, queue, prefetch=1)
    await backend.lose_connection(doomed)
    redelivered = await inbox.next()
    if how == "requeue":
        await held.nack(requeue=True)
    elif how == "nack":
        await held.nack(requeue=False)
    else:
        await getattr(held, how)()
    await inbox.expect_nothing()
    assert await backend.ready(survivor, queue) == 0
    await redelivered.ack()


async def test_a_lost_connection_deletes_its_exclusive_queues(backend: Backend) -> None:
    """Exclusive queues die with the link, like on a clean close."""
    doomed, survivor = await backend.connect(), await backend.connect()
    name = await backend.queue(doomed, exclusive=True, durable=False)
    await backend.lose_connection(doomed)
    await backend.wait_until(lambda: queue_is_gone(survivor, name), "exclusive queue deleted")


async def test_is_connected_is_false_after_a_loss(backend: Backend, transport: Transport) -> None:
    """The transport knows its link is gone once the loss was reported."""
    assert transport.is_connected
    await backend.lose_connection(transport)
    assert not transport.is_connected


async def test_operations_on_a_lost_connection_raise_broker_unavailable(
    backend: Backend, transport: Transport
) -> None:
    """After the loss (not a close) every operation raises BrokerUnavailableError."""
    queue = await backend.queue(transport)
    await backend.publish(transport, b"warm up the publish channel", routing_key=queue)
    await backend.lose_connection(transport)
    with pytest.raises(BrokerUnavailableError):
        await backend.publish(transport, b"x", routing_key=queue)
    with pytest.raises(BrokerUnavailableError):
        await transport.declare_queue(QueueSpec(name=backend.unique("q")))
    with pytest.raises(BrokerUnavailableError):
        await transport.queue_info(queue)
    with pytest.raises(BrokerUnavailableError):
        await backend.consume(transport, queue)


# -- lifecycle -----------------------------------------------------------------------


async def test_is_connected_follows_the_lifecycle(backend: Backend) -> None:
    """False before connect, True while connected, False after aclose."""
    transport = backend.new_transport()
    seen = [transport.is_connected]
    await transport.connect()
    seen.append(transport.is_connected)
    await transport.aclose()
    seen.append(transport.is_connected)
    assert seen == [False, True, False]


async def test_connect_twice_raises_lifecycle_error(backend: Backend) -> None:
    """connect() runs once, also after aclose()."""
    transport = await backend.connect()
    with pytest.raises(LifecycleError):
        await transport.connect()
    assert transport.is_connected
    await transport.aclose()
    with pytest.raises(LifecycleError):
        await transport.connect()


async def test_use_before_connect_raises_lifecycle_error(backend: Backend) -> None:
    """Publishing or declaring on a new transport is a LifecycleError."""
    transport = backend.new_transport()
    with pytest.raises(LifecycleError):
        await backend.publish(transport, b"x", routing_key="q")
    with pytest.raises(LifecycleError):
        await transport.declare_exchange(backend.unique("x"), ExchangeKind.DIRECT)


async def test_use_after_aclose_raises_lifecycle_error(backend: Backend) -> None:
    """Every operation after aclose() is a LifecycleError (not a broker error)."""
    transport = await backend.connect()
    queue = await backend.queue(transport)
    await transport.aclose()
    with pytest.raises(LifecycleError):
        await transport.publish(Envelope(body=b"x", routing_key=queue), timeout_s=PUBLISH_TIMEOUT_S)
    with pytest.raises(LifecycleError):
        await transport.declare_queue(QueueSpec(name=backend.unique("q")))
    with pytest.raises(LifecycleError):
        await transport.bind_queue(queue, "amq.direct", "k")
    with pytest.raises(LifecycleError):
        await transport.queue_info(queue)
    with pytest.raises(LifecycleError):
        await backend.consume(transport, queue)


async def test_aclose_is_idempotent_and_does_not_report_a_loss(backend: Backend) -> None:
    """A deliberate close never runs the connection-lost callbacks."""
    transport = await backend.connect()
    calls: list[BaseException | None] = []
    transport.on_connection_lost(calls.append)
    await transport.aclose()
    await transport.aclose()
    assert calls == []
    await backend.new_transport().aclose()  # closing a never-connected one is fine too


async def test_aclose_returns_unsettled_deliveries_to_the_queue(backend: Backend) -> None:
    """Closing the connection requeues what its consumers held."""
    closing, other = await backend.connect(), await backend.connect()
    queue = await backend.queue(other)
    await backend.publish(other, b"x", routing_key=queue)
    await (await backend.consume(closing, queue)).next()
    await closing.aclose()
    inbox = await backend.consume(other, queue)
    delivery = await inbox.next()
    assert (delivery.envelope.body, delivery.envelope.redelivered) == (b"x", True)
