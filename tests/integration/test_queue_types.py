"""Quorum agent queues on the real broker: declared with the right type, served, retried
and dead-lettered; a queue that exists with the other type is a clear error."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from amqp_agents.config import RetryPolicy
from amqp_agents.errors import TopologyMismatchError
from amqp_agents.models.topology import QueueType, Topology
from amqp_agents.runtime.worker import Worker
from amqp_agents.testing import BrokerAdmin
from amqp_agents.transport.rabbitmq import RabbitTransport
from tests.agents_for_tests import FAST_BACKOFF, Flaky, rig, scenario_poison_is_dead_lettered

pytestmark = pytest.mark.integration

Connect = Callable[..., Awaitable[RabbitTransport]]
Unique = Callable[[str], str]
QUORUM = Topology(queue_type=QueueType.QUORUM)


def queue_types(admin: BrokerAdmin, vhost: str) -> dict[str, str]:
    """Queue name -> type, as the broker reports it."""
    out = admin.run("list_queues", "-p", vhost, "--no-table-headers", "name", "type")
    return dict(line.split("\t")[:2] for line in out.splitlines() if "\t" in line)


async def test_poison_message_on_a_quorum_queue_is_dead_lettered_with_its_attempts(
    connect: Connect, unique: Unique, broker_admin: BrokerAdmin, module_vhost: str
) -> None:
    """Every queue of the agent is a quorum queue; the retry tiers (TTL, dead-lettered at
    least once) bring the request back with x-attempt 2, 3; then the dead-letter queue."""
    policy = RetryPolicy(
        attempts=1,
        backoff_initial_s=FAST_BACKOFF,
        redelivery_delays_s=(0.2, 0.4),
        max_deliveries=3,
    )
    agent = Flaky(name=unique("quorum"))
    async with rig(connect, agent, policy, topology=QUORUM) as r:
        await scenario_poison_is_dead_lettered(r, timeout_s=20)
        types = queue_types(broker_admin, module_vhost)
        ours = {name: kind for name, kind in types.items() if agent.name in name}
        assert ours == {
            r.queue: "quorum",
            r.dead_queue: "quorum",
            QUORUM.agent_retry_queue(agent.name, 200): "quorum",
            QUORUM.agent_retry_queue(agent.name, 400): "quorum",
        }


async def test_a_queue_of_the_other_type_is_a_clear_mismatch(
    connect: Connect, unique: Unique
) -> None:
    """A classic agent queue exists; a worker configured for quorum refuses to start with
    TopologyMismatchError naming the queue and both types (and does not loop)."""
    agent = Flaky(name=unique("mismatch"))
    classic = Worker(await connect(), [agent])
    await classic.start()
    await classic.stop()
    quorum = Worker(await connect(), [Flaky(name=agent.name)], topology=QUORUM)
    with pytest.raises(TopologyMismatchError) as caught:
        await quorum.start()
    text = str(caught.value)
    assert f"agents.{agent.name}" in text
    assert "quorum" in text
    assert "classic" in text
