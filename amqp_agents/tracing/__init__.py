"""OpenTelemetry tracing: spans for publishes, deliveries, settlements and RPC calls.

Optional (the ``otel`` extra). Nothing in the library imports this module: an
application that wants traces builds one :class:`Tracing` and passes it to the
:class:`~amqp_agents.rpc.client.RpcClient`, the :class:`~amqp_agents.runtime.worker.Worker`
and the :class:`~amqp_agents.events.bus.EventBus`, as it passes a ``Metrics``. Without
one they never look at OpenTelemetry (one ``None`` check at construction, one per call).

How: each of them hands its transport to :meth:`Tracing.wrap`, which returns a
:class:`~amqp_agents.transport.base.Transport` that traces around the real one, so
every publish and every settlement of the library is seen in one place, whoever makes
it (requests, replies, events, retries, dead letters). The RPC client adds its call's
span with :meth:`Tracing.call`. The spans follow the OpenTelemetry messaging semantic
conventions for RabbitMQ (development status; the names are those of semconv 1.3x)::

    span            kind      name                      when
    --------------  --------  ------------------------  -----------------------------------
    call            CLIENT    {agent}/{action}          RpcClient.send/call: publish to reply
    send            PRODUCER  send {exchange}:{key}     every publish (request, reply, event)
    process         CONSUMER  process {exchange}:{key}  every delivery of an acked consumer
                              [:{queue}]                (requests, events; not replies)
    settle          CLIENT    ack|nack|reject {dest}    every settlement, child of process

A destination the broker named (``amq.gen-...``: reply and private event queues) is
left out of span names (it is unique per process) and marked ``anonymous`` and
``temporary``. The send span's context travels in the message's ``traceparent`` and
``tracestate`` headers (through the propagator configured in the OpenTelemetry API,
W3C trace context by default; see docs/protocol.md); a process span is a child of the
context it finds there, or a root. It is current while the delivery is processed, so
calls and events a handler makes are its children, in tasks the handler starts too.

``error.type``: on a send, the exception's class name (``UnroutableError``...); on a
call, the reply's error code (``NOT_FOUND``, ``TIMEOUT``, ``NO_ROUTE``...); on a
process span, the exception that escaped processing, else the code of the error reply
or dead letter the delivery produced, else ``rejected`` for a rejected delivery. (A
try that is retried later through a delay queue is not marked; its last try is.)
"""

from __future__ import annotations

try:
    import opentelemetry.trace  # noqa: F401  # the extra is installed?
except ImportError as exc:  # pragma: no cover - only without the extra
    raise ImportError(
        "amqp_agents.tracing needs OpenTelemetry: pip install 'amqp-agents[otel]'"
    ) from exc

from amqp_agents.tracing.spans import Tracing

__all__ = ["Tracing"]
