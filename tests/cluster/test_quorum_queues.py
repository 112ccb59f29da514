"""Quorum agent queues on RabbitMQ 4.0 (a node of the cluster): priorities and poison.

* **Priority**: 4.0 gives quorum queues two levels, normal (0-4) and high (5-9),
  delivered about 2:1 while both wait. A backlog of normal requests is overtaken by high
  ones sent after it; the measured share is printed and quoted in ``docs/protocol.md``.
* **Poison**: the worker's own attempt count (``x-attempt``, retry tiers) dead-letters a
  request after ``max_deliveries``, also past the broker's delivery limit (20 by default
  since 4.0): every redelivery through a retry tier is a new message, so the broker's
  ``x-delivery-count`` never reaches its limit.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import pytest

from amqp_agents.config import RetryPolicy, WorkerSettings
from amqp_agents.models.topology import QueueType, Topology
from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.worker import Worker
from amqp_agents.transport.rabbitmq import RabbitTransport
from tests.agents_for_tests import FAST_BACKOFF, Flaky, rig, scenario_poison_is_dead_lettered
from tests.cluster.conftest import Cluster
from tests.support import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

QUORUM = Topology(queue_type=QueueType.QUORUM)
NORMAL = 60
"""Requests of normal priority queued first (priorities 0-4)."""
HIGH = 30
"""Requests of high priority queued after them (priorities 5-9)."""
FIRST = 30
"""The deliveries the share is measured on."""

Connect = Callable[..., Awaitable[RabbitTransport]]


@pytest.fixture
def amqp_url(cluster: Cluster, cluster_vhost: str) -> str:
    """The first node, in the test's vhost: where ``connect()`` (tests/conftest.py) goes."""
    return cluster.nodes[0].vhost_url(cluster_vhost)


async def test_high_priority_overtakes_a_normal_backlog(connect: Connect) -> None:
    """60 normal requests (priority 0-4) queued, then 30 high ones (5-9); a worker with
    concurrency 1 starts: high ones come first about 2:1, and normal ones still flow."""
    name = f"prio-{uuid.uuid4().hex[:8]}"
    # A worker declares the queue and its binding, then stops: requests wait queued.
    first = Worker(await connect(), [Flaky(name=name)], topology=QUORUM)
    await first.start()
    await first.stop()
    async with RpcClient(await connect(), topology=QUORUM) as client:
        for n in range(NORMAL):
            await client.notify(name, "echo", {"id": n}, priority=n % 5, timeout_s=60)
        for n in range(HIGH):
            await client.notify(name, "echo", {"id": 1000 + n}, priority=5 + n % 5, timeout_s=60)
    agent = Flaky(name=name)
    worker = Worker(
        await connect(), [agent], topology=QUORUM, settings=WorkerSettings(concurrency=1)
    )
    await worker.start()
    try:
        await wait_until(
            lambda: len(agent.log) >= NORMAL + HIGH, timeout_s=30, what="every request handled"
        )
    finally:
        await worker.stop()
    order = [n for _action, n, _t in agent.log]
    high_first = sum(1 for n in order[:FIRST] if n >= 1000)
    high_positions = [i for i, n in enumerate(order) if n >= 1000]
    print(
        f"\nquorum priorities on 4.0: of the first {FIRST} deliveries {high_first} were high"
        f" ({high_first / FIRST:.0%}; FIFO: 0); last high one delivered at position"
        f" {high_positions[-1] + 1} of {len(order)} (FIFO: {NORMAL + HIGH})"
    )
    assert sorted(order) == [*range(NORMAL), *range(1000, 1000 + HIGH)]
    # About 2:1 while both wait: more than half high, yet normal ones are not starved.
    assert FIRST // 2 < high_first < FIRST, order[:FIRST]
    # Within a level, FIFO.
    assert [n for n in order if n < 1000] == list(range(NORMAL))
    assert [n for n in order if n >= 1000] == list(range(1000, 1000 + HIGH))


@pytest.mark.parametrize("max_deliveries", [3, 25])
async def test_poison_message_on_a_quorum_queue_is_dead_lettered(
    connect: Connect, max_deliveries: int
) -> None:
    """Dead-lettered after exactly ``max_deliveries`` (x-attempt), including 25: past the
    broker's default delivery limit of 20, which never counts our redeliveries."""
    policy = RetryPolicy(
        attempts=1,
        backoff_initial_s=FAST_BACKOFF,
        redelivery_delays_s=(0.05, 0.1),
        max_deliveries=max_deliveries,
    )
    agent = Flaky(name=f"poison-{uuid.uuid4().hex[:8]}")
    async with rig(connect, agent, policy, topology=QUORUM) as r:
        await scenario_poison_is_dead_lettered(r, timeout_s=60)
        counts = [
            (e.headers or {}).get("x-delivery-count") for e in r.tap.deliveries(r.queue, "poison")
        ]
    print(f"\npoison on a quorum queue, {max_deliveries} deliveries: x-delivery-count {counts}")
    # Every delivery was a first delivery of a new message (republished via a retry tier).
    assert set(counts) <= {None, 0}, counts
