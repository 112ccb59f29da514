"""An in-process broker and transport with RabbitMQ's semantics.

Not a mock: messages go through real exchanges and queues. It implements what the
library relies on, the way RabbitMQ 3.10 does it, and the shared contract tests
(``tests/contract``) hold both transports to the same behaviour:

* exchanges: direct, topic (``*``/``#`` via :func:`~amqp_agents.models.topic.topic_matches`),
  fanout, and the default exchange ``""`` (routes to the queue named by the key);
* queues: durable flag, exclusive (owned by one connection, deleted with it),
  auto-delete (deleted when its last consumer goes), server-named (``name=""``),
  ``x-max-priority`` (higher first, FIFO within a priority, above the max counts as
  the max, none counts as 0), ``x-dead-letter-exchange``/``-routing-key``;
* per-message ``expiration``: expires at the head of the queue (as in RabbitMQ), then
  dead-lettered with reason ``expired`` or dropped;
* consumers: prefetch (unacked deliveries count against it), round-robin, no-ack;
  each delivery runs in its own task, like aiormq's;
* settlement: ack, nack(requeue) with ``redelivered=True``, reject to the dead-letter
  exchange; a second settlement, or one after the consumer's channel closed, is a no-op;
* mandatory publishes that match no queue raise ``UnroutableError``;
* deleting a queue (:meth:`InMemoryBroker.delete_queue`) cancels its consumers as
  RabbitMQ's ``basic.cancel`` does, and every consumer reports its end through
  ``on_end`` (cancelled, channel closed, connection lost);
* :meth:`InMemoryTransport.simulate_connection_loss` drops a connection the way a cut
  TCP link does, and :meth:`InMemoryTransport.simulate_channel_close` closes one
  consumer's channel the way a broker's channel error does, for fault-injection tests.

Known differences: nothing is persisted (durable only matters for redeclaration
checks); there is no flow control, no memory alarm, and publishes never block;
``x-death`` is reduced to the ``x-first-death-*`` headers; queue arguments other than
priority, dead-lettering, ``x-message-ttl`` and ``x-max-length`` with ``x-overflow:
reject-publish`` (``x-max-length-bytes``, drop-head...) are checked on redeclaration but
not enforced.

The implementation is split along its seams in :mod:`amqp_agents.transport.mem`.
"""

from amqp_agents.transport.mem.broker import BrokerStatistics, InMemoryBroker
from amqp_agents.transport.mem.transport import InMemoryTransport

__all__ = ["BrokerStatistics", "InMemoryBroker", "InMemoryTransport"]
