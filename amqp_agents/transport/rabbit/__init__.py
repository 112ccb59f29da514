"""The RabbitMQ transport, split along its seams; the only package that imports aio-pika.

* :mod:`~amqp_agents.transport.rabbit.transport`: ``RabbitTransport``, its channels,
  topology calls, publishing and consuming;
* :mod:`~amqp_agents.transport.rabbit.link`: the two connections and reconnects;
* :mod:`~amqp_agents.transport.rabbit.consumer`: consumers, deliveries, admission;
* :mod:`~amqp_agents.transport.rabbit.codec`: envelopes to and from AMQP frames;
* :mod:`~amqp_agents.transport.rabbit.errors`: the one error mapper.

Users import :class:`RabbitTransport` from :mod:`amqp_agents.transport.rabbitmq`.
"""
