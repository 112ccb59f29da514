"""Refusals that need no broker to show: untrusted reply_to and ids, re-send pacing,
callbacks that outlive their owners."""

from __future__ import annotations

import gc
import time
import weakref
from typing import Any, cast

import pytest

from amqp_agents.errors import BrokerUnavailableError
from amqp_agents.metrics import Metrics
from amqp_agents.models.envelope import Envelope
from amqp_agents.models.messages import ErrorCode, IdSource
from amqp_agents.models.topology import Topology
from amqp_agents.models.wire import encode_request
from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.agent import Agent, action
from amqp_agents.runtime.worker import Worker
from amqp_agents.transport.base import QueueSpec
from amqp_agents.transport.memory import InMemoryBroker, InMemoryTransport
from amqp_agents.transport.rabbit.consumer import channel_on
from tests.support import wait_until

TOPOLOGY = Topology()


class Once(Agent):
    def __init__(self, *, name: str) -> None:
        super().__init__(name=name)
        self.runs = 0

    @action("run")
    async def act(self, payload: dict[str, Any]) -> dict[str, Any]:
        self.runs += 1
        return payload


async def test_a_reply_into_an_agent_queue_is_dropped_not_sent() -> None:
    """reply_to naming another agent's queue: handled once, nothing posted there."""
    broker = InMemoryBroker()
    transport = InMemoryTransport(broker)
    await transport.connect()
    agent = Once(name="victim_caller")
    victim = await transport.declare_queue(QueueSpec(name=TOPOLOGY.agent_queue("billing")))
    metrics = Metrics()
    worker = Worker(transport, [agent], metrics=metrics)
    await worker.start()
    try:
        envelope = encode_request(
            TOPOLOGY,
            agent.name,
            "run",
            b"{}",
            message_id="m1",
            correlation_id="c1",
            reply_to=victim,
            priority=4,
            timeout_s=10,
            max_bytes=1 << 20,
        )
        await transport.publish(envelope, mandatory=True, timeout_s=1)
        labels = {"agent": agent.name, "action": "run", "outcome": "reply_dropped"}

        async def dropped() -> bool:
            value = metrics.registry.get_sample_value("amqp_agents_messages_handled_total", labels)
            return value == 1

        await wait_until(dropped, timeout_s=2, what="the reply counted as dropped")
    finally:
        await worker.stop()
    assert agent.runs == 1
    assert (await transport.queue_info(victim)).messages == 0
    assert (await transport.queue_info(TOPOLOGY.agent_queue(agent.name))).messages == 0


def test_ids_are_unique_and_not_guessable_from_one_seen() -> None:
    first, second = IdSource(), IdSource()
    ids = [first.next() for _ in range(1000)]
    assert len(set(ids)) == 1000
    prefix, n, tag = ids[0].split(".")
    assert (len(prefix), n, len(tag)) == (16, "1", 12)
    # The same counter in another source has another tag: the tag is random.
    assert second.next().split(".")[2] != tag


class FailingPublishes(InMemoryTransport):
    """Every request publish fails as on a link that is down; counts them."""

    def __init__(self, broker: InMemoryBroker) -> None:
        super().__init__(broker)
        self.request_publishes = 0

    async def publish(self, envelope: Envelope, **options: Any) -> None:
        if envelope.exchange == TOPOLOGY.requests_exchange:
            self.request_publishes += 1
            raise BrokerUnavailableError("publish failed: the link is down")
        await super().publish(envelope, **options)


async def test_an_idempotent_call_re_sends_with_backoff_not_in_a_hot_loop() -> None:
    transport = FailingPublishes(InMemoryBroker())
    await transport.connect()
    async with RpcClient(transport) as client:
        started = time.monotonic()
        reply = await client.send("agent", "act", {}, timeout_s=1.0, idempotent=True)
        took_s = time.monotonic() - started
    assert reply.error is not None
    assert reply.error.code in {ErrorCode.TIMEOUT, ErrorCode.CONNECTION_LOST}
    assert took_s < 2
    # 0.05 + 0.1 + 0.2 + 0.4 s of pauses fit in 1 s: five or six tries, not thousands.
    assert 2 <= transport.request_publishes <= 8, transport.request_publishes


async def test_closed_clients_leave_no_callbacks_behind() -> None:
    """Many short-lived clients on one transport: none is kept alive by it."""
    transport = InMemoryTransport()
    await transport.connect()
    refs = []
    for _ in range(200):
        client = RpcClient(transport)
        await client.start()
        await client.aclose()
        refs.append(weakref.ref(client))
        del client
    gc.collect()
    assert sum(1 for ref in refs if ref() is not None) == 0


class _ClosedConnection:
    """An aio-pika connection that closed just as a channel was asked of it."""

    is_closed = True

    async def channel(self, **_options: object) -> None:
        raise RuntimeError("<Connection: amqp://...> closed")  # what aiormq raises


async def test_a_channel_asked_of_a_closing_connection_is_a_transport_error() -> None:
    """Not a bare RuntimeError escaping the error tree (it ended callers' tasks in the
    broker-restart fault test, and would end a consumer's re-attach loop)."""
    with pytest.raises(BrokerUnavailableError, match="connection closed"):
        await channel_on(cast("Any", _ClosedConnection()), publisher_confirms=True)
