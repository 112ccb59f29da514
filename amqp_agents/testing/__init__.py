"""Helpers for testing code built on amqp-agents: in memory, or against a real broker.

The pytest fixtures live in :mod:`amqp_agents.testing.pytest_plugin` (imported only
when you enable it, so this package does not need pytest).
"""

from amqp_agents.models.context import MessageContext, use_context
from amqp_agents.testing.broker import (
    BrokerAdmin,
    BrokerAdminError,
    QueueRow,
    broker_reachable,
    url_for_vhost,
)
from amqp_agents.testing.harness import AgentHarness

__all__ = [
    "AgentHarness",
    "BrokerAdmin",
    "BrokerAdminError",
    "MessageContext",
    "QueueRow",
    "broker_reachable",
    "url_for_vhost",
    "use_context",
]
