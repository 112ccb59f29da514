"""The spans: what each is called, carries, and descends from (see the package docstring).

What a message costs, by case (the hot paths are written for it; the benchmark cases
``inmemory.otel-api`` and ``inmemory.otel-sdk`` measure it, see the README):

- **No SDK configured** (the OpenTelemetry API's no-op or not-yet-set global provider):
  no span is started and no attribute built; nothing is wrapped. A call is awaited as
  is; a publish injects headers only when the current context holds something (an
  empty context has no span and no baggage to carry); a delivery is handed on as is
  unless its headers carry one of the propagator's fields or the current context is not
  empty. Whether the global provider is still unset is asked once per call, publish
  and delivery (it may be set after this object is built); once an SDK provider is
  found, that is final, as in the API.
- **SDK configured**: the spans are started with ``start_span`` (not the API's context
  managers, two generator layers each) and their attributes passed at the start, as
  samplers may read them; the name and the attributes a destination shares are made
  once per destination (a bounded cache); a delivery whose process span is not
  recording (sampled out) gets no settle spans and no error tracking, but its context
  is current and goes on in the headers, so the sampling decision travels.

A caller's trace context is **continued when no SDK is configured here**: a request
or event whose headers carry ``traceparent`` is processed with that (remote,
non-recording) span current, so what the handler publishes carries the same
``traceparent`` on. The OpenTelemetry specification asks this of the API without an
SDK (a non-recording span with the parent's context), so that a service which does
not trace does not cut the trace of the services around it; it costs an extraction and
an attach only for messages that carry a trace context, that is when the caller traces.
The extraction is skipped when no header is one of the propagator's declared ``fields``
(a propagator that reads headers it does not declare is not passed through without an
SDK; with one, every delivery with headers is extracted).

It is about 450 lines because the span conventions (names, kinds, attributes) and the
fast paths that skip them when nothing records are two views of the same spans; they
are kept together so that a change to one is checked against the other.
"""

from __future__ import annotations

import dataclasses
import json
import operator
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.trace import NoOpTracer, ProxyTracer, ProxyTracerProvider, SpanKind

from amqp_agents.models.envelope import Envelope
from amqp_agents.models.topology import HEADER_ERROR_CODE
from amqp_agents.tracing.transport import TracedDelivery, TracedTransport, fail

if TYPE_CHECKING:
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.trace import Span, Tracer, TracerProvider
    from opentelemetry.util.types import AttributeValue

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
_DESCRIBED_MAX: Final = 256
"""Destinations whose span name and shared attributes are kept (then forgotten at once)."""

# Envelope's fields in __init__ order: a copy by one C call and a positional __init__,
# four times cheaper than dataclasses.replace (tests/unit/test_tracing_fast_paths.py checks
# that it copies every field).
_ENVELOPE_FIELDS: Final = operator.attrgetter(*(f.name for f in dataclasses.fields(Envelope)))

_Description: TypeAlias = tuple[str, dict[str, "AttributeValue"]]
"""A destination's span name, and the attributes its messages share."""


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
    provider (a no-op until an SDK is configured, which may happen after this object is
    built). Headers are injected and extracted with the API's global propagator.
    ``server_address``/``server_port`` name the broker on every span (the CLI passes
    the URL's host and port).
    """

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        server_address: str | None = None,
        server_port: int | None = None,
    ) -> None:
        self._provider = tracer_provider
        self._tracer: Tracer | None = None
        self._unset: ProxyTracerProvider | None = None
        """The global provider while it is the API's proxy (no SDK set yet)."""
        self._server: dict[str, AttributeValue] = {}
        if server_address:
            self._server["server.address"] = server_address
            if server_port is not None:
                self._server["server.port"] = server_port
        self._described: dict[tuple[str, str, str, str | None], _Description] = {}
        self._propagator: TextMapPropagator | None = None
        self._fields: frozenset[str] = frozenset()
        self._resolve()

    def wrap(self, transport: Transport) -> Transport:
        """``transport`` with its publishes, deliveries and settlements traced
        (itself if it is already traced by this object)."""
        if isinstance(transport, TracedTransport) and transport.tracing is self:
            return transport
        return TracedTransport(transport, self)

    def call(
        self, agent: str, action: str, start: Callable[[], Coroutine[Any, Any, AgentResponse]]
    ) -> Coroutine[Any, Any, AgentResponse]:
        """The call ``start()`` makes (one RPC call, publish to reply) in a CLIENT span,
        to be awaited."""
        tracer = self._active()
        if tracer is None:
            return start()  # not even a frame of ours around it
        return self._call(tracer, f"{agent}/{action}", start)

    async def _call(
        self, tracer: Tracer, method: str, start: Callable[[], Coroutine[Any, Any, AgentResponse]]
    ) -> AgentResponse:
        attributes: dict[str, AttributeValue] = {
            "rpc.system.name": "amqp_agents",
            "rpc.method": method,
            "messaging.system": "rabbitmq",
            **self._server,
        }
        current = otel_context.get_current()
        span = tracer.start_span(method, current, SpanKind.CLIENT, attributes)
        token = otel_context.attach(trace.set_span_in_context(span, current))
        try:
            response = await start()
        except BaseException as exc:
            fail(span, type(exc).__qualname__, str(exc))
            raise
        else:
            if response.error is not None:
                fail(span, str(response.error.code), response.error.message)
            return response
        finally:
            otel_context.detach(token)
            span.end()

    # -- the transport's side ----------------------------------------------------------

    def publish(
        self,
        transport: Transport,
        envelope: Envelope,
        mandatory: bool,
        confirm: bool,
        timeout_s: float,
    ) -> Coroutine[Any, Any, None]:
        """Publishing ``envelope`` on ``transport`` in a send span, its context in the
        headers, to be awaited."""
        current = otel_context.get_current()
        processing = current.get(_PROCESSING)
        if isinstance(processing, Processing):
            processing.saw(envelope)
        tracer = self._active()
        if tracer is not None:
            return self._publish(
                tracer, current, transport, envelope, mandatory, confirm, timeout_s
            )
        if current:  # a context passed through (see the module docstring)
            envelope = _carrying(envelope, current)
        return transport.publish(
            envelope, mandatory=mandatory, confirm=confirm, timeout_s=timeout_s
        )

    async def _publish(
        self,
        tracer: Tracer,
        current: Context,
        transport: Transport,
        envelope: Envelope,
        mandatory: bool,
        confirm: bool,
        timeout_s: float,
    ) -> None:
        name, shared = self._describe("send", envelope.exchange, envelope.routing_key, None)
        span = tracer.start_span(name, current, SpanKind.PRODUCER, _attributes(shared, envelope))
        sending = trace.set_span_in_context(span, current)
        token = otel_context.attach(sending)
        try:
            await transport.publish(
                _carrying(envelope, sending),
                mandatory=mandatory,
                confirm=confirm,
                timeout_s=timeout_s,
            )
        except BaseException as exc:
            fail(span, type(exc).__qualname__, str(exc))
            raise
        finally:
            otel_context.detach(token)
            span.end()

    def processing(self, queue: str, handler: DeliveryHandler) -> DeliveryHandler:
        """``handler`` run in a process span per delivery, its settlements traced."""

        def on_delivery(delivery: Delivery) -> Awaitable[None]:
            tracer = self._active()
            if tracer is not None:
                return self._process(tracer, queue, handler, delivery)
            # No SDK. The message's context, never the ambient one (a delivery task may
            # have been started from the publisher's own context, in process).
            headers = delivery.envelope.headers
            if headers and not self._propagated_fields().isdisjoint(headers):
                parent = propagate.extract(headers, context=Context(), getter=_HEADERS)
            elif otel_context.get_current():
                parent = Context()
            else:
                return handler(delivery)  # nothing to carry: the handler as it is
            return _in_context(parent, handler, delivery)

        return on_delivery

    async def _process(
        self, tracer: Tracer, queue: str, handler: DeliveryHandler, delivery: Delivery
    ) -> None:
        envelope = delivery.envelope
        headers = envelope.headers
        parent = (
            propagate.extract(headers, context=Context(), getter=_HEADERS) if headers else Context()
        )
        name, shared = self._describe("process", envelope.exchange, envelope.routing_key, queue)
        attributes = _attributes(shared, envelope)
        span = tracer.start_span(name, parent, SpanKind.CONSUMER, attributes)
        current = trace.set_span_in_context(span, parent)
        scope: Processing | None = None
        if span.is_recording():
            scope = Processing(tracer, span, name, current, attributes, envelope.reply_to)
            current = otel_context.set_value(_PROCESSING, scope, current)
            delivery = TracedDelivery(delivery, scope)
        token = otel_context.attach(current)
        try:
            await handler(delivery)
        except BaseException as exc:
            if scope is not None:
                scope.fail(type(exc).__qualname__, str(exc))
            raise
        finally:
            otel_context.detach(token)
            span.end()

    def _active(self) -> Tracer | None:
        """The tracer to start spans with, ``None`` while no SDK is configured."""
        if self._unset is None:
            return self._tracer
        # The global provider was the API's proxy: has an SDK's been set since? The API
        # keeps it in a module attribute, None until set; reading that is some 40 times
        # cheaper than the public ways (get_tracer_provider looks the environment up,
        # the proxy's get_tracer builds two tracers), and this is asked per message.
        # Were the attribute ever renamed, the public way is taken every time.
        if getattr(trace, "_TRACER_PROVIDER", self) is None:
            return None
        tracer = self._unset.get_tracer(SCOPE)
        if isinstance(tracer, ProxyTracer):
            return None
        self._unset = None
        self._tracer = None if isinstance(tracer, NoOpTracer) else tracer
        return self._tracer

    def _resolve(self) -> None:
        provider = self._provider
        if provider is None or isinstance(provider, ProxyTracerProvider):
            # The API's global provider (set from the environment, if it says so, by
            # get_tracer_provider): a proxy until an SDK's is set, once and for good.
            provider = trace.get_tracer_provider()
            if isinstance(provider, ProxyTracerProvider):
                self._unset = provider
                return
        tracer = provider.get_tracer(SCOPE)
        self._tracer = None if isinstance(tracer, NoOpTracer) else tracer

    def _propagated_fields(self) -> frozenset[str]:
        """The header names the global propagator injects (kept while it stays the same)."""
        propagator = propagate.get_global_textmap()
        if propagator is not self._propagator:
            self._fields = frozenset(propagator.fields)
            self._propagator = propagator
        return self._fields

    def _describe(self, operation: str, exchange: str, key: str, queue: str | None) -> _Description:
        """The span name and the attributes every message to this destination shares."""
        found = self._described.get((operation, exchange, key, queue))
        if found is not None:
            return found
        name, anonymous = _name(operation, exchange, key, queue)
        shared: dict[str, AttributeValue] = {
            "messaging.system": "rabbitmq",
            "messaging.operation.type": operation,
            "messaging.operation.name": operation,
            "messaging.destination.name": _destination(exchange, key, queue),
            **self._server,
        }
        if key:
            shared["messaging.rabbitmq.destination.routing_key"] = key
        if anonymous:
            shared["messaging.destination.anonymous"] = True
            shared["messaging.destination.temporary"] = True
        if len(self._described) >= _DESCRIBED_MAX:
            self._described.clear()
        found = self._described[operation, exchange, key, queue] = (name, shared)
        return found


class Processing:
    """One delivery being processed: its span, and what tells that it failed."""

    __slots__ = ("attributes", "context", "error", "reply_to", "span", "span_name", "tracer")

    def __init__(
        self,
        tracer: Tracer,
        span: Span,
        span_name: str,
        context: Context,
        attributes: dict[str, AttributeValue],
        reply_to: str | None,
    ) -> None:
        self.tracer = tracer
        self.span = span
        self.span_name = span_name
        self.context = context
        self.attributes = attributes
        self.reply_to = reply_to
        self.error: str | None = None

    def settle(self, operation: str) -> Span:
        """A settle span (``ack``, ``nack``, ``reject``), child of the process span."""
        attributes = self.attributes.copy()
        attributes["messaging.operation.type"] = "settle"
        attributes["messaging.operation.name"] = operation
        del attributes["messaging.message.body.size"]
        name = self.span_name.replace("process", operation, 1)
        return self.tracer.start_span(name, self.context, SpanKind.CLIENT, attributes)

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


def _attributes(shared: dict[str, AttributeValue], envelope: Envelope) -> dict[str, AttributeValue]:
    """A message's span attributes: its destination's, and its own size and ids."""
    attributes = shared.copy()
    attributes["messaging.message.body.size"] = len(envelope.body)
    if envelope.message_id:
        attributes["messaging.message.id"] = envelope.message_id
    if envelope.correlation_id:
        attributes["messaging.message.conversation_id"] = envelope.correlation_id
    return attributes


async def _in_context(context: Context, handler: DeliveryHandler, delivery: Delivery) -> None:
    """``handler(delivery)`` with ``context`` current."""
    token = otel_context.attach(context)
    try:
        await handler(delivery)
    finally:
        otel_context.detach(token)


def _carrying(envelope: Envelope, context: Context) -> Envelope:
    """``envelope`` with ``context`` injected into a copy of its headers; itself when the
    propagator had nothing to inject."""
    original = envelope.headers or {}
    headers: dict[str, Any] = dict(original)
    propagate.inject(headers, context=context, setter=_HEADERS)
    if headers == original:
        return envelope
    carrying = Envelope(*_ENVELOPE_FIELDS(envelope))
    carrying.headers = headers
    return carrying


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
