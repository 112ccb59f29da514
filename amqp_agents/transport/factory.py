"""Build the transport a URL names (``amqp://``, ``amqps://``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from amqp_agents.transport.rabbitmq import RabbitTransport

if TYPE_CHECKING:
    from amqp_agents.config import ConnectionSettings
    from amqp_agents.transport.base import Transport

__all__ = ["create_transport"]


def create_transport(settings: ConnectionSettings) -> Transport:
    """A new, unconnected transport for ``settings.url``."""
    return RabbitTransport(settings)
