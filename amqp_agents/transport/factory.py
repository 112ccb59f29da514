"""Build the transport a URL names: ``amqp://``/``amqps://`` RabbitMQ, ``memory://``."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from amqp_agents.transport.memory import InMemoryBroker, InMemoryTransport
from amqp_agents.transport.rabbitmq import RabbitTransport

if TYPE_CHECKING:
    from amqp_agents.config import ConnectionSettings
    from amqp_agents.transport.base import Transport

__all__ = ["create_transport", "is_memory_url"]


def is_memory_url(url: str) -> bool:
    """True for ``memory://`` URLs (the in-process broker)."""
    return urlsplit(url).scheme == "memory"


def create_transport(
    settings: ConnectionSettings, *, memory_broker: InMemoryBroker | None = None
) -> Transport:
    """A new, unconnected transport for ``settings.url``.

    ``memory://`` gives an :class:`InMemoryTransport` on ``memory_broker``; pass the
    same broker to every transport that must see the same queues (a new one otherwise).
    """
    if is_memory_url(settings.url.get_secret_value()):
        return InMemoryTransport(memory_broker)
    return RabbitTransport(settings)
