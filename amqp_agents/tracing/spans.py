"""The spans: what each is called, carries, and descends from (see the package docstring)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.trace import SpanKind

from amqp_agents.models.topology import HEADER_ERROR_CODE
from amqp_agents.tracing.transport import TracedDelivery, TracedTransport, fail

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, TracerProvider
    from opentelemetry.util.types import AttributeValue

    from amqp_agents.models.envelope import Envelope
    from amqp_agents.models.messages import AgentResponse
    from amqp_agents.transport.base import (
        Delivery,
        DeliveryHandler,
        Transport,
    )

__all__ = ["SCOPE", "Processing", "Tracing"]

SCOPE: Final = "amqp_agents"
"""The instrumentation scope name of every span."""

_ANONYMOUS_PREFIX: Final = "amq.gen-"
_PROCESSING: Final = otel_context.create_key("amqp-agents-processing")
_ERROR_REPLY: Final = b'{"ok":false'


class _Headers(Getter[Mapping[str, Any]], Setter[dict[str, Any]]):
    """AMQP headers as a propagation carrier (other clients may send bytes values)."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return list(carrier)

    def set(self, carrier: dict[str, Any], key: str, value: str) -> None:
        carrier[key] = value


_HEADERS: Final = _Headers()


class Tracing:
    """Makes the spans; one per process, passed to the client, worker and bus.

    ``tracer_provider``: where spans go; by default the OpenTelemetry API's global
    provider (a no-op until an SDK is configured). Headers are injected and extracted
    with the API's global propagator. ``server_address``/``server_port`` name the
    broker on every span (the CLI passes the URL's host and port).
    """

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        server_address: str | None = None,
        server_port: int | None = None,
    ) -> None:
        self._tracer = trace.get_tracer(SCOPE, tracer_provider=tracer_provider)
        self._server: dict[str, AttributeValue] = {}
        if server_address:
            self._server["server.address"] = server_address
            if server_port is not None:
                self._server["server.port"] = server_port

    def wrap(self, transport: Transport) -> Transport:
        """``transport`` with its publishes, deliveries and settlements traced
        (itself if it is already traced by this object)."""
        if isinstance(transport, TracedTransport) and transport.tracing is self:
            return transport
        return TracedTransport(transport, self)

    async def call(
        self, agent: str, action: str, sending: Awaitable[AgentResponse]
    ) -> AgentResponse:
        """Await ``sending`` (one RPC call, publish to reply) in a CLIENT span."""
        method = f"{agent}/{action}"
        attributes: dict[str, AttributeValue] = {
            "rpc.system.name": "amqp_agents",
            "rpc.method": method,
            "messaging.system": "rabbitmq",
            **self._server,
        }
        with self._tracer.start_as_current_span(
            method,
            kind=SpanKind.CLIENT,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                response = await sending
            except BaseException as exc:
                fail(span, type(exc).__qualname__, str(exc))
                raise
            if response.error is not None:
                fail(span, str(response.error.code), response.error.message)
            return response

    # -- the transport's side ----------------------------------------------------------

    async def publish(
        self,
        transport: Transport,
        envelope: Envelope,
        mandatory: bool,
        confirm: bool,
        timeout_s: float,
    ) -> None:
        """Publish ``envelope`` on ``transport`` in a send span, its context in the headers."""
        exchange, key = envelope.exchange, envelope.routing_key
        attributes = self._attributes("send", envelope, exchange, key, None)
        name, anonymous = _name("send", exchange, key, None)
        if anonymous:
            attributes["messaging.destination.anonymous"] = True
            attributes["messaging.destination.temporary"] = True
        processing = otel_context.get_value(_PROCESSING)
        if isinstance(processing, Processing):
            processing.saw(envelope)
        with self._tracer.start_as_current_span(
            name,
            kind=SpanKind.PRODUCER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            headers: dict[str, Any] = dict(envelope.headers or {})
            propagate.inject(headers, setter=_HEADERS)
            traced = dataclasses.replace(envelope, headers=headers)
            try:
                await transport.publish(
                    traced, mandatory=mandatory, confirm=confirm, timeout_s=timeout_s
                )
            except BaseException as exc:
                fail(span, type(exc).__qualname__, str(exc))
                raise

    def processing(self, queue: str, handler: DeliveryHandler) -> DeliveryHandler:
        """``handler`` run in a process span per delivery, its settlements traced."""
        tracer = self._tracer

        async def on_delivery(delivery: Delivery) -> None:
            envelope = delivery.envelope
            exchange, key = envelope.exchange, envelope.routing_key
            # The message's context, never the ambient one (a delivery task may have
            # been started from the publisher's own context, in process).
            parent = propagate.extract(envelope.headers or {}, context=_empty(), getter=_HEADERS)
            attributes = self._attributes("process", envelope, exchange, key, queue)
            name, anonymous = _name("process", exchange, key, queue)
            if anonymous:
                attributes["messaging.destination.anonymous"] = True
                attributes["messaging.destination.temporary"] = True
            span = tracer.start_span(
                name, context=parent, kind=SpanKind.CONSUMER, attributes=attributes
            )
            current = trace.set_span_in_context(span, parent)
            scope = Processing(self, span, name, current, attributes, envelope.reply_to)
            token = otel_context.attach(otel_context.set_value(_PROCESSING, scope, current))
            try:
                await handler(TracedDelivery(delivery, scope))
            except BaseException as exc:
                scope.fail(type(exc).__qualname__, str(exc))
                raise
            finally:
                otel_context.detach(token)
                span.end()

        return on_delivery

    def settle(self, scope: Processing, operation: str) -> Span:
        """A settle span (``ack``, ``nack``, ``reject``), child of the process span."""
        attributes = dict(scope.attributes)
        attributes["messaging.operation.type"] = "settle"
        attributes["messaging.operation.name"] = operation
        attributes.pop("messaging.message.body.size", None)
        name = scope.span_name.replace("process", operation, 1)
        return self._tracer.start_span(
            name, context=scope.context, kind=SpanKind.CLIENT, attributes=attributes
        )

    def _attributes(
        self, operation: str, envelope: Envelope, exchange: str, key: str, queue: str | None
    ) -> dict[str, AttributeValue]:
        attributes: dict[str, AttributeValue] = {
            "messaging.system": "rabbitmq",
            "messaging.operation.type": operation,
            "messaging.operation.name": operation,
            "messaging.destination.name": _destination(exchange, key, queue),
            "messaging.message.body.size": len(envelope.body),
            **self._server,
        }
        if key:
            attributes["messaging.rabbitmq.destination.routing_key"] = key
        if envelope.message_id:
            attributes["messaging.message.id"] = envelope.message_id
        if envelope.correlation_id:
            attributes["messaging.message.conversation_id"] = envelope.correlation_id
        return attributes


class Processing:
    """One delivery being processed: its span, and what tells that it failed."""

    __slots__ = ("attributes", "context", "error", "reply_to", "span", "span_name", "tracing")

    def __init__(
        self,
        tracing: Tracing,
        span: Span,
        span_name: str,
        context: Context,
        attributes: dict[str, AttributeValue],
        reply_to: str | None,
    ) -> None:
        self.tracing = tracing
        self.span = span
        self.span_name = span_name
        self.context = context
        self.attributes = attributes
        self.reply_to = reply_to
        self.error: str | None = None

    def fail(self, error_type: str, description: str | None = None) -> None:
        if self.error is None:  # the first failure seen is the cause
            self.error = error_type
            fail(self.span, error_type, description)

    def saw(self, envelope: Envelope) -> None:
        """A message published while processing: an error reply to this delivery's
        caller, or a dead letter, says the processing failed, and with which code."""
        headers = envelope.headers
        if headers:
            code = headers.get(HEADER_ERROR_CODE)
            if isinstance(code, str):
                self.fail(code)
                return
        if (
            self.reply_to
            and envelope.routing_key == self.reply_to
            and envelope.body.startswith(_ERROR_REPLY)
        ):
            self.fail(_error_code(envelope.body))


def _destination(exchange: str, key: str, queue: str | None) -> str:
    """``messaging.destination.name`` for RabbitMQ: ``{exchange}:{routing key}[:{queue}]``,
    empty parts left out, the queue only when it differs from the routing key."""
    parts = [exchange, key] if queue is None or queue == key else [exchange, key, queue]
    return ":".join(part for part in parts if part) or "amq.default"


def _name(operation: str, exchange: str, key: str, queue: str | None) -> tuple[str, bool]:
    """The span name, and whether the destination is anonymous (broker-named)."""
    anonymous = key.startswith(_ANONYMOUS_PREFIX) or (
        queue is not None and queue.startswith(_ANONYMOUS_PREFIX)
    )
    if anonymous:
        # A per-process name would make every span name unique: the exchange and a
        # routing key that is not the queue's own name still say where it went.
        if key.startswith(_ANONYMOUS_PREFIX):
            key = ""
        kept = _destination(exchange, key, None) if exchange or key else ""
        return (f"{operation} {kept}" if kept else operation), True
    return f"{operation} {_destination(exchange, key, queue)}", False


def _error_code(body: bytes) -> str:
    """The code of an error reply (``{"ok":false,"error":{"code":...}}``), or ``_OTHER``."""
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "_OTHER"
    return code if isinstance(code, str) else "_OTHER"


def _empty() -> Context:
    return otel_context.Context()
