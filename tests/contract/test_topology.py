"""Declarations: idempotency, mismatches, server names, exclusive and auto-delete queues,
and what a passive declare (``queue_info``) reports."""

from __future__ import annotations

from typing import Any

import pytest

from amqp_agents.errors import QueueNotFoundError, ResourceLockedError, TopologyMismatchError
from amqp_agents.models.envelope import HeaderValue
from amqp_agents.transport.base import ExchangeKind, QueueSpec, Transport
from tests.contract.conftest import Backend


async def queue_is_gone(transport: Transport, queue: str) -> bool:
    try:
        await transport.queue_info(queue)
    except QueueNotFoundError:
        return True
    return False


async def test_declarations_are_idempotent_with_equal_arguments(
    backend: Backend, transport: Transport
) -> None:
    """Declaring the same exchange and queue twice succeeds and keeps the messages."""
    exchange, name = backend.unique("direct"), backend.unique("q")
    spec = QueueSpec(name=name, arguments={"x-max-priority": 9})
    for _ in range(2):
        await transport.declare_exchange(exchange, ExchangeKind.DIRECT)
        assert await transport.declare_queue(spec) == name
    await backend.publish(transport, b"x", routing_key=name)
    assert await transport.declare_queue(spec) == name
    assert await backend.ready(transport, name) == 1


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"arguments": {"x-max-priority": 9}}, {"arguments": {"x-max-priority": 5}}),
        ({"arguments": {"x-max-priority": 9}}, {}),
        ({}, {"arguments": {"x-max-priority": 9}}),
        ({"arguments": {"x-dead-letter-exchange": "a"}}, {"arguments": {}}),
        ({"durable": True}, {"durable": False}),
        ({"auto_delete": False}, {"auto_delete": True}),
    ],
    ids=[
        "other-max-priority",
        "priority-dropped",
        "priority-added",
        "dead-letter-dropped",
        "other-durable",
        "other-auto-delete",
    ],
)
async def test_redeclaring_a_queue_with_other_properties_raises_topology_mismatch(
    backend: Backend, transport: Transport, first: dict[str, Any], second: dict[str, Any]
) -> None:
    """PRECONDITION_FAILED maps to TopologyMismatchError; the transport keeps working."""
    name = backend.unique("q")
    await transport.declare_queue(QueueSpec(name=name, **first))
    with pytest.raises(TopologyMismatchError):
        await transport.declare_queue(QueueSpec(name=name, **second))
    assert await transport.declare_queue(QueueSpec(name=name, **first)) == name


async def test_redeclaring_with_an_argument_rabbitmq_does_not_compare_succeeds(
    backend: Backend, transport: Transport
) -> None:
    """Only known arguments (x-max-priority, x-dead-letter-*...) must match."""
    name = backend.unique("q")
    await transport.declare_queue(QueueSpec(name=name, arguments={"x-app-version": 1}))
    other_values: list[dict[str, HeaderValue]] = [{"x-app-version": 2}, {}]
    for arguments in other_values:
        assert await transport.declare_queue(QueueSpec(name=name, arguments=arguments)) == name


async def test_redeclaring_an_exchange_as_another_kind_raises_topology_mismatch(
    backend: Backend, transport: Transport
) -> None:
    """An exchange's kind cannot change; the transport keeps working after."""
    exchange = backend.unique("x")
    await transport.declare_exchange(exchange, ExchangeKind.DIRECT)
    with pytest.raises(TopologyMismatchError):
        await transport.declare_exchange(exchange, ExchangeKind.TOPIC)
    await transport.declare_exchange(exchange, ExchangeKind.DIRECT)


async def test_server_named_queues_get_fresh_amq_gen_names(
    backend: Backend, transport: Transport
) -> None:
    """``name=""`` gives a new ``amq.gen-`` name per declaration, usable at once."""
    spec = QueueSpec(name="", durable=False, exclusive=True)
    first, second = await transport.declare_queue(spec), await transport.declare_queue(spec)
    assert first != second
    assert first.startswith("amq.gen-")
    assert second.startswith("amq.gen-")
    await backend.publish(transport, b"x", routing_key=first)
    assert [await backend.ready(transport, q) for q in (first, second)] == [1, 0]


async def test_exclusive_queue_is_locked_to_its_connection(backend: Backend) -> None:
    """Another connection can't declare, consume or inspect it: ResourceLockedError."""
    owner, other = await backend.connect(), await backend.connect()
    name = await backend.queue(owner, exclusive=True, durable=False)
    with pytest.raises(ResourceLockedError):
        await other.declare_queue(QueueSpec(name=name, exclusive=True, durable=False))
    with pytest.raises(ResourceLockedError):
        await backend.consume(other, name)
    with pytest.raises(ResourceLockedError):
        await other.queue_info(name)
    assert other.is_connected
    assert await backend.ready(other, await backend.queue(other)) == 0


async def test_another_connection_may_publish_to_an_exclusive_queue(backend: Backend) -> None:
    """Exclusivity restricts consumers, not publishers."""
    owner, other = await backend.connect(), await backend.connect()
    name = await backend.queue(owner, exclusive=True, durable=False)
    await backend.publish(other, b"reply", routing_key=name, mandatory=True)
    assert await backend.ready(owner, name) == 1


async def test_exclusive_queue_is_deleted_when_its_connection_closes(backend: Backend) -> None:
    """Closing the owner deletes its exclusive queues."""
    owner, other = await backend.connect(), await backend.connect()
    name = await backend.queue(owner, exclusive=True, durable=False)
    await owner.aclose()
    await backend.wait_until(lambda: queue_is_gone(other, name), "exclusive queue deleted")


@pytest.mark.parametrize("how", ["cancel", "close"])
async def test_auto_delete_queue_is_deleted_when_its_last_consumer_goes(
    backend: Backend, transport: Transport, how: str
) -> None:
    """An auto-delete queue outlives its first consumer only while another remains."""
    name = await backend.queue(transport, auto_delete=True)  # durable: 4.3 refuses transient ones
    first = await backend.consume(transport, name)
    second = await backend.consume(transport, name)
    assert first.consumer is not None
    assert second.consumer is not None
    await getattr(first.consumer, how)()
    assert (await transport.queue_info(name)).consumers == 1
    await getattr(second.consumer, how)()
    await backend.wait_until(lambda: queue_is_gone(transport, name), "auto-delete queue gone")


async def test_auto_delete_queue_never_consumed_stays(
    backend: Backend, transport: Transport
) -> None:
    """Auto-delete only triggers once a consumer has come and gone."""
    name = await backend.queue(transport, auto_delete=True)  # durable: 4.3 refuses transient ones
    await backend.publish(transport, b"x", routing_key=name)
    assert await backend.ready(transport, name) == 1


async def test_queue_info_counts_ready_messages_and_consumers_not_unacked(
    backend: Backend, transport: Transport
) -> None:
    """``messages`` excludes unacked deliveries; ``consumers`` counts live consumers."""
    name = await backend.queue(transport)
    for n in range(3):
        await backend.publish(transport, str(n).encode(), routing_key=name)
    info = await transport.queue_info(name)
    assert (info.name, info.messages, info.consumers) == (name, 3, 0)
    inbox = await backend.consume(transport, name, prefetch=1)
    await inbox.next()
    info = await transport.queue_info(name)
    assert (info.name, info.messages, info.consumers) == (name, 2, 1)


async def test_queue_info_of_a_missing_queue_raises_and_the_transport_keeps_working(
    backend: Backend, transport: Transport
) -> None:
    """QueueNotFoundError (a LookupError); later calls still work."""
    with pytest.raises(QueueNotFoundError):
        await transport.queue_info(backend.unique("missing"))
    with pytest.raises(LookupError):
        await transport.queue_info(backend.unique("missing"))
    assert await backend.ready(transport, await backend.queue(transport)) == 0


async def test_consuming_a_missing_queue_raises_queue_not_found(
    backend: Backend, transport: Transport
) -> None:
    """consume() on an unknown queue raises QueueNotFoundError."""
    with pytest.raises(QueueNotFoundError):
        await backend.consume(transport, backend.unique("missing"))
    assert await backend.ready(transport, await backend.queue(transport)) == 0
