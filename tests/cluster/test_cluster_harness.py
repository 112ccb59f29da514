"""The cluster harness works: a quorum queue outlives its leader's node (plain aio-pika).

No library code here: this proves the fixture (three joined nodes, stopping and starting
one, finding a queue's leader) before the library's own cluster tests use it.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import aio_pika
import pytest

from tests.cluster.conftest import Cluster

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

# A new leader is elected within a few seconds of the old one's node stopping.
FAILOVER_TIMEOUT_S = 30.0


async def test_a_quorum_queue_serves_from_another_node_when_its_leader_stops(
    cluster: Cluster,
) -> None:
    """Publish (confirmed) to a quorum queue on node 1, stop the node that leads the
    queue, and the message is consumed from a surviving node; the node is started again."""
    queue_name = f"cluster-smoke-{uuid.uuid4().hex[:8]}"
    body = uuid.uuid4().bytes
    first = cluster.nodes[0]
    connection = await aio_pika.connect(first.url, timeout=10)
    async with connection:
        channel = await connection.channel()  # publisher confirms on
        queue = await channel.declare_queue(
            queue_name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await channel.default_exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue.name,
            timeout=10,
        )
    leader = await asyncio.to_thread(cluster.quorum_leader, queue_name)
    survivor = cluster.others(leader)[0]
    try:
        async with cluster.astopped(leader):
            stopped_at = time.monotonic()
            got = await _get_one(survivor.url, queue_name)
            print(
                f"\n{leader.name} (leader) stopped: message consumed from {survivor.name} "
                f"{time.monotonic() - stopped_at:.1f} s after the stop returned"
            )
            assert got == body
            new_leader = await asyncio.to_thread(cluster.quorum_leader, queue_name)
            assert new_leader != leader
        running = await asyncio.to_thread(cluster.running_nodes, first)
        assert running == {node.name for node in cluster.nodes}
    finally:
        connection = await aio_pika.connect(survivor.url, timeout=10)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(queue_name)


async def _get_one(url: str, queue_name: str) -> bytes:
    """Get one message from ``queue_name`` through ``url``, retrying (bounded) while the
    queue has no leader yet; the message is acked."""
    deadline = time.monotonic() + FAILOVER_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            connection = await aio_pika.connect(url, timeout=5)
            async with connection:
                channel = await connection.channel()
                queue = await channel.get_queue(queue_name, ensure=False)
                message = await queue.get(timeout=5, fail=False)
                if message is not None:
                    await message.ack()
                    return message.body
        except (aio_pika.exceptions.AMQPError, TimeoutError, OSError) as exc:
            last = exc  # no leader elected yet: the channel is closed with an error
        await asyncio.sleep(0.5)
    raise AssertionError(f"no message from {queue_name} within {FAILOVER_TIMEOUT_S:g} s: {last!r}")
