"""The RabbitMQ transport's public home: ``from amqp_agents.transport.rabbitmq import
RabbitTransport``. The implementation lives in :mod:`amqp_agents.transport.rabbit`."""

from amqp_agents.transport.rabbit.transport import RabbitTransport

__all__ = ["RabbitTransport"]
