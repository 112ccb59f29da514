"""What the RPC client publishes, and what a call keeps while it waits for its reply."""

import asyncio
import inspect

import pytest
from pydantic import BaseModel

from amqp_agents import Agent, action
from amqp_agents.config import RpcSettings
from amqp_agents.models.envelope import Envelope
from amqp_agents.models.topology import Topology
from amqp_agents.rpc.client import RpcClient
from amqp_agents.rpc.pending import PendingCall
from amqp_agents.runtime.worker import Worker
from amqp_agents.transport.base import Delivery, Transport
from amqp_agents.transport.memory import InMemoryBroker, InMemoryTransport


class Numbered(BaseModel):
    n: int


class Echo(Agent):
    """Never started here: only its queue is declared."""

    @action("echo")
    async def echo(self, payload: Numbered) -> Numbered:
        return payload


async def declare_agent_queue(transport: Transport, agent: str) -> str:
    """The agent's queue as a worker declares it (a worker started and stopped)."""
    worker = Worker(transport, [Echo(name=agent)])
    await worker.start()
    await worker.stop()
    return Topology().agent_queue(agent)


@pytest.mark.parametrize(
    ("settings", "persistent"),
    [(None, True), (RpcSettings(), True), (RpcSettings(persistent=False), False)],
)
async def test_requests_are_published_as_the_settings_say(
    settings: RpcSettings | None, persistent: bool
) -> None:
    """Persistent (delivery mode 2) by default; transient with ``persistent=False``."""
    async with InMemoryTransport(InMemoryBroker()) as transport:
        queue = await declare_agent_queue(transport, "echo")
        arrived: asyncio.Queue[Envelope] = asyncio.Queue()

        async def on_request(delivery: Delivery) -> None:
            await delivery.ack()
            arrived.put_nowait(delivery.envelope)

        await transport.consume(queue, on_request, prefetch=1)
        async with RpcClient(transport, settings=settings) as client:
            await client.notify("echo", "echo", {"n": 1})
            call = asyncio.create_task(client.send("echo", "echo", {"n": 2}, timeout_s=0.5))
            notified, sent = await arrived.get(), await arrived.get()
            reply = await call
    assert (notified.persistent, sent.persistent) == (persistent, persistent)
    assert reply.code == "TIMEOUT"  # nobody answered: the request itself was what counted


@pytest.mark.parametrize("idempotent", [False, True])
async def test_a_waiting_call_keeps_its_request_only_to_send_it_again(idempotent: bool) -> None:
    """The request (envelope and body) is most of a pending call's memory: only an
    idempotent call, which is sent again after a lost link, keeps it."""
    async with InMemoryTransport(InMemoryBroker()) as transport:
        queue = await declare_agent_queue(transport, "echo")
        arrived = asyncio.Event()

        async def on_request(delivery: Delivery) -> None:
            arrived.set()  # published: the caller now waits for the reply (never sent)

        await transport.consume(queue, on_request, prefetch=1)
        async with RpcClient(transport) as client:
            coro = client.send("echo", "echo", {"n": 1}, timeout_s=5, idempotent=idempotent)
            call = asyncio.create_task(coro)
            await arrived.wait()
            waiting = inspect.getcoroutinelocals(coro)  # what the waiting call's frame keeps
            call.cancel()
    assert "envelope" not in waiting
    pending = waiting["call"]
    assert isinstance(pending, PendingCall)
    assert (pending.request is not None) is idempotent
