"""Helpers for testing code built on amqp-agents against a real broker."""

from amqp_agents.testing.broker import (
    BrokerAdmin,
    BrokerAdminError,
    QueueRow,
    broker_reachable,
    url_for_vhost,
)

__all__ = ["BrokerAdmin", "BrokerAdminError", "QueueRow", "broker_reachable", "url_for_vhost"]
