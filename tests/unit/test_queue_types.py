"""Queue declarations by kind and type: every argument the library declares comes from
:class:`~amqp_agents.models.topology.Topology`, so these pin the wire contract."""

import pytest
from pydantic import ValidationError

from amqp_agents.errors import TopologyMismatchError
from amqp_agents.models.topology import QueueSpec, QueueType, Topology
from amqp_agents.transport.memory import InMemoryBroker, InMemoryTransport

CLASSIC = Topology()
QUORUM = Topology(queue_type=QueueType.QUORUM)


def test_classic_agent_queue_is_a_priority_queue() -> None:
    """The default: a durable classic queue with x-max-priority and no dead-lettering."""
    assert CLASSIC.agent_queue_spec("billing") == QueueSpec(
        "agents.billing", arguments={"x-max-priority": 9}
    )


def test_quorum_agent_queue_has_no_max_priority() -> None:
    """Quorum queues refuse x-max-priority on 3.x and ignore it on 4.3: never sent."""
    spec = QUORUM.agent_queue_spec("billing")
    assert spec == QueueSpec("agents.billing", arguments={"x-queue-type": "quorum"})
    assert (spec.durable, spec.exclusive, spec.auto_delete) == (True, False, False)


def test_retry_tiers_lead_back_to_the_agent_queue_on_both_types() -> None:
    """TTL then dead-letter to the agent queue; quorum tiers dead-letter at least once."""
    classic = CLASSIC.agent_retry_spec("billing", 500)
    assert classic == QueueSpec(
        "agents.billing.retry.500",
        arguments={
            "x-message-ttl": 500,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "agents.billing",
        },
    )
    quorum = QUORUM.agent_retry_spec("billing", 500)
    assert quorum.arguments == {
        **classic.arguments,
        "x-queue-type": "quorum",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def test_group_queues_dead_letter_to_their_group() -> None:
    """A group queue rejects into events.dlx with its group as the key, on either type."""
    assert CLASSIC.group_queue_spec("audit").arguments == {
        "x-dead-letter-exchange": "events.dlx",
        "x-dead-letter-routing-key": "audit",
    }
    assert QUORUM.group_queue_spec("audit").arguments["x-queue-type"] == "quorum"
    assert QUORUM.group_dead_letter_spec("audit") == QueueSpec(
        "events.audit.dead", arguments={"x-queue-type": "quorum"}
    )
    assert CLASSIC.agent_dead_letter_spec("billing") == QueueSpec("agents.billing.dead")


def test_overrides_by_agent_and_by_group() -> None:
    """queue_types names agents plainly and groups as events:<group>; the rest keep the
    default type."""
    topology = Topology(queue_types={"billing": QueueType.QUORUM, "events:audit": "quorum"})
    assert topology.agent_type("billing") is QueueType.QUORUM
    assert topology.agent_type("other") is QueueType.CLASSIC
    assert topology.group_type("audit") is QueueType.QUORUM
    assert topology.group_type("billing") is QueueType.CLASSIC
    assert "x-queue-type" in topology.agent_dead_letter_spec("billing").arguments


def test_private_queues_are_exclusive() -> None:
    """Reply and private event queues: server-named, exclusive (accepted by RabbitMQ 4.3,
    which refuses transient non-exclusive queues)."""
    spec = Topology.private_queue_spec()
    assert (spec.name, spec.durable, spec.exclusive, spec.auto_delete) == ("", False, True, True)


def test_an_unknown_queue_type_is_refused() -> None:
    """A typo in settings fails at start, naming the allowed values."""
    with pytest.raises(ValidationError, match="classic"):
        Topology.model_validate({"queue_type": "stream"})


async def test_in_memory_broker_names_both_types_on_a_mismatch() -> None:
    """As on RabbitMQ: redeclaring a classic agent queue as quorum is a clear error."""
    transport = InMemoryTransport(InMemoryBroker())
    await transport.connect()
    try:
        await transport.declare_queue(CLASSIC.agent_queue_spec("billing"))
        with pytest.raises(TopologyMismatchError, match="classic queue, this declares a quorum"):
            await transport.declare_queue(QUORUM.agent_queue_spec("billing"))
    finally:
        await transport.aclose()
