"""A client and an event bus come back by themselves after a lost connection, on both
transports: pending calls fail (or are re-sent when idempotent), calls made during the
outage wait within their bound, subscriptions are consumed again."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from amqp_agents.errors import BrokerUnavailableError, PublishTimeoutError
from amqp_agents.events.bus import EventBus
from amqp_agents.models.messages import ErrorCode
from amqp_agents.rpc.client import Request, RpcClient
from amqp_agents.transport.memory import InMemoryTransport
from tests.contract.conftest import Backend
from tests.contract.test_layers import Echo, Gate, running


async def started_client(backend: Backend, **options: Any) -> tuple[RpcClient, Any]:
    transport = backend.reconnecting_transport()
    await transport.connect()
    client = RpcClient(transport, **options)
    await client.start()
    return client, transport


async def test_client_fails_pending_calls_then_works_again(backend: Backend) -> None:
    """CONNECTION_LOST for the call in flight; after the reconnect a new reply queue
    serves new calls (the old one died with the connection)."""
    gate = Gate(name=backend.unique("gate"))
    echo = Echo(name=backend.unique("echo"))
    async with running(await backend.connect(), [gate, echo]):
        client, transport = await started_client(backend)
        try:
            old_queue = client.reply_queue
            call = asyncio.create_task(client.send(gate.name, "hold", timeout_s=30))
            await asyncio.wait_for(gate.entered.get(), backend.timeout_s)
            await backend.lose_connection(transport)
            response = await asyncio.wait_for(call, backend.timeout_s)
            assert response.error is not None
            assert response.error.code == ErrorCode.CONNECTION_LOST
            await backend.come_back(transport)
            assert await client.call(echo.name, "echo", {"n": 1}, timeout_s=5) == {"n": 1}
            assert client.reply_queue != old_queue
            assert client.pending_calls == 0
        finally:
            gate.release.set()
            await client.aclose()


async def test_a_call_made_during_the_outage_waits_for_the_reconnect(backend: Backend) -> None:
    echo = Echo(name=backend.unique("echo"))
    async with running(await backend.connect(), [echo]):
        client, transport = await started_client(backend)
        try:
            await backend.lose_connection(transport)
            call = asyncio.create_task(client.call(echo.name, "echo", {"n": 2}, timeout_s=10))
            await asyncio.sleep(0)
            assert not call.done()
            await backend.come_back(transport)
            assert await asyncio.wait_for(call, backend.timeout_s) == {"n": 2}
        finally:
            await client.aclose()


async def test_a_call_during_an_outage_that_lasts_fails_within_its_bound() -> None:
    """Nobody hangs: no reconnect within the publish timeout -> CONNECTION_LOST.
    (In memory, where the outage lasts until the test says; on RabbitMQ the proxy
    tests keep the broker unreachable.)"""
    transport = InMemoryTransport()
    await transport.connect()
    async with RpcClient(transport, publish_timeout_s=0.3) as client:
        transport.simulate_connection_loss(will_reconnect=True)
        began = time.monotonic()
        response = await client.send("someone", "something", timeout_s=10)
        elapsed = time.monotonic() - began
    assert response.error is not None
    assert response.error.code == ErrorCode.CONNECTION_LOST
    assert "not restored within 0.3s" in response.error.message
    assert 0.25 < elapsed < 2


async def test_an_idempotent_call_is_sent_again_after_the_reconnect(backend: Backend) -> None:
    """The idempotent call in flight at the loss is answered after it; the other
    one fails, and the handler saw the idempotent request twice."""
    gate = Gate(name=backend.unique("gate"))
    async with running(await backend.connect(), [gate]):
        client, transport = await started_client(backend)
        try:
            safe = asyncio.create_task(
                client.send(gate.name, "hold", {"n": "safe"}, timeout_s=30, idempotent=True)
            )
            unsafe = asyncio.create_task(client.send(gate.name, "hold", {"n": "unsafe"}))
            first = {
                (await asyncio.wait_for(gate.entered.get(), backend.timeout_s))["n"]
                for _ in range(2)
            }
            assert first == {"safe", "unsafe"}
            await backend.lose_connection(transport)
            failed = await asyncio.wait_for(unsafe, backend.timeout_s)
            assert failed.error is not None
            assert failed.error.code == ErrorCode.CONNECTION_LOST
            assert not safe.done()
            await backend.come_back(transport)
            again = await asyncio.wait_for(gate.entered.get(), backend.timeout_s)
            assert again == {"n": "safe"}
            gate.release.set()
            answered = await asyncio.wait_for(safe, backend.timeout_s)
            assert answered.ok, answered.error
            assert answered.data == {"n": "safe"}
            assert client.resent == 1
            assert client.pending_calls == 0
        finally:
            gate.release.set()
            await client.aclose()


async def test_send_many_marks_requests_idempotent(backend: Backend) -> None:
    echo = Echo(name=backend.unique("echo"))
    async with running(await backend.connect(), [echo]):
        client, transport = await started_client(backend)
        try:
            await backend.lose_connection(transport)
            batch = asyncio.create_task(
                client.send_many(
                    [Request(echo.name, "echo", {"n": n}, idempotent=True) for n in range(3)]
                )
            )
            await backend.come_back(transport)
            responses = await asyncio.wait_for(batch, backend.timeout_s)
        finally:
            await client.aclose()
    assert [r.data for r in responses] == [{"n": n} for n in range(3)]


async def test_closing_the_client_during_an_outage_ends_waiting_calls() -> None:
    """(In memory: on RabbitMQ the outage is over before the test could close.)"""
    transport = InMemoryTransport()
    await transport.connect()
    client = RpcClient(transport)
    await client.start()
    transport.simulate_connection_loss(will_reconnect=True)
    call = asyncio.create_task(client.send("someone", "something", timeout_s=30))
    await asyncio.sleep(0)
    await client.aclose()
    response = await asyncio.wait_for(call, 1)
    assert response.error is not None
    assert response.error.code == ErrorCode.SHUTTING_DOWN


# -- events --------------------------------------------------------------------------


async def test_bus_consumes_groups_and_private_queues_again(backend: Backend) -> None:
    """After the reconnect both kinds of subscription get events again; events
    published to the group during the outage waited in its durable queue."""
    transport = backend.reconnecting_transport()
    await transport.connect()
    publisher_transport = await backend.connect()
    group = backend.unique("g")
    kind = backend.unique("evt").replace("-", "_")
    grouped: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    private: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def on_group(payload: dict[str, Any]) -> None:
        grouped.put_nowait(payload)

    async def on_private(payload: dict[str, Any]) -> None:
        private.put_nowait(payload)

    bus = EventBus(transport)
    publisher = EventBus(publisher_transport)
    await bus.start()
    await publisher.start()
    try:
        await bus.subscribe(f"{kind}.*", on_group, group=group)
        await bus.subscribe(f"{kind}.#", on_private)
        await publisher.publish(f"{kind}.a", {"n": 1})
        assert await asyncio.wait_for(grouped.get(), backend.timeout_s) == {"n": 1}
        assert await asyncio.wait_for(private.get(), backend.timeout_s) == {"n": 1}

        await backend.lose_connection(transport)
        if isinstance(transport, InMemoryTransport):  # RabbitMQ's may be back already
            assert bus.consumers == 0
        await publisher.publish(f"{kind}.a", {"n": 2})  # waits in the group's queue
        await backend.come_back(transport)
        assert bus.consumers == 2
        assert await asyncio.wait_for(grouped.get(), backend.timeout_s) == {"n": 2}

        await publisher.publish(f"{kind}.a", {"n": 3})
        assert await asyncio.wait_for(grouped.get(), backend.timeout_s) == {"n": 3}
        # The private queue may have been back in time for n=2 (not on memory).
        seen = await asyncio.wait_for(private.get(), backend.timeout_s)
        if seen == {"n": 2} and not isinstance(transport, InMemoryTransport):
            seen = await asyncio.wait_for(private.get(), backend.timeout_s)
        assert seen == {"n": 3}
        info = await publisher_transport.queue_info(f"events.{group}")
        assert info.consumers == 1  # re-attached once, not zero, not twice
    finally:
        await bus.aclose()
        await publisher.aclose()


async def test_a_publish_during_the_outage_waits_for_the_reconnect(backend: Backend) -> None:
    transport = backend.reconnecting_transport()
    await transport.connect()
    bus = EventBus(transport, publish_timeout_s=10)
    await bus.start()
    try:
        await backend.lose_connection(transport)
        publish = asyncio.create_task(bus.publish("nobody.listens", {"n": 1}))
        await asyncio.sleep(0)
        assert not publish.done()
        await backend.come_back(transport)
        assert await asyncio.wait_for(publish, backend.timeout_s)
    finally:
        await bus.aclose()


# -- flow control (the in-memory stand-in; the broker's alarm is in integration) -----


async def test_blocked_publishes_wait_then_fail_clearly() -> None:
    transport = InMemoryTransport()
    await transport.connect()
    bus = EventBus(transport, publish_timeout_s=0.2)
    await bus.start()
    try:
        transport.simulate_blocked(True)
        assert transport.is_blocked
        with pytest.raises(PublishTimeoutError, match="blocks publishing"):
            await bus.publish("a.b")
        waiting = asyncio.create_task(bus.publish("a.b"))
        await asyncio.sleep(0)
        transport.simulate_blocked(False)
        assert await asyncio.wait_for(waiting, 1)
        assert not transport.is_blocked
    finally:
        await bus.aclose()
        await transport.aclose()


async def test_without_reconnect_a_lost_transport_fails_publishes_at_once(
    backend: Backend,
) -> None:
    transport = await backend.connect()
    bus = EventBus(transport, publish_timeout_s=10)
    await bus.start()
    try:
        await backend.lose_connection(transport)
        began = time.monotonic()
        with pytest.raises(BrokerUnavailableError):
            await bus.publish("a.b")
        assert time.monotonic() - began < 1
    finally:
        await bus.aclose()
