"""Requests are persistent unless ``RpcSettings(persistent=False)`` says otherwise."""

import asyncio

import pytest

from amqp_agents.config import RpcSettings
from amqp_agents.models.envelope import Envelope
from amqp_agents.models.topology import Topology
from amqp_agents.rpc.client import RpcClient
from amqp_agents.transport.base import Delivery
from amqp_agents.transport.memory import InMemoryBroker, InMemoryTransport


@pytest.mark.parametrize("persistent", [True, False])
async def test_requests_take_the_clients_persistence(persistent: bool) -> None:
    """Calls and notifications are published with delivery mode 2, or 1 when asked."""
    topology = Topology()
    transport = InMemoryTransport(InMemoryBroker())
    await transport.connect()
    received: asyncio.Queue[Envelope] = asyncio.Queue()

    async def handle(delivery: Delivery) -> None:
        received.put_nowait(delivery.envelope)
        await delivery.ack()

    try:
        settings = None if persistent else RpcSettings(persistent=False)
        async with RpcClient(transport, settings=settings) as client:
            queue = await transport.declare_queue(topology.agent_queue_spec("agent"))
            await transport.bind_queue(queue, topology.requests_exchange, "agent")
            await transport.consume(queue, handle, prefetch=10)
            await client.notify("agent", "act", {})
            await client.send("agent", "act", {}, timeout_s=0.01)  # nobody replies
            envelopes = [await received.get(), await received.get()]
    finally:
        await transport.aclose()
    assert [envelope.persistent for envelope in envelopes] == [persistent, persistent]


def test_persistent_by_default() -> None:
    """The default keeps what the protocol asks for: requests survive a broker restart."""
    assert RpcSettings().persistent is True
