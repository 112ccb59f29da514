"""Tracing's fast paths keep its meaning: no SDK, a sampled-out span, an SDK set late."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from amqp_agents.models.envelope import Envelope
from amqp_agents.models.topology import QueueSpec
from amqp_agents.tracing import Tracing
from amqp_agents.tracing.spans import _carrying
from amqp_agents.tracing.transport import TracedDelivery
from amqp_agents.transport.base import Delivery, Transport
from amqp_agents.transport.memory import InMemoryBroker, InMemoryTransport

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_ID = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"


@pytest.fixture
async def transport() -> AsyncIterator[InMemoryTransport]:
    async with InMemoryTransport(InMemoryBroker()) as transport:
        yield transport


class Seen:
    """What a consumer got: the delivery, and the span current while it ran."""

    def __init__(self) -> None:
        self.deliveries: asyncio.Queue[tuple[Delivery, trace.Span]] = asyncio.Queue()

    async def __call__(self, delivery: Delivery) -> None:
        await self.deliveries.put((delivery, trace.get_current_span()))
        await delivery.ack()

    async def next(self) -> tuple[Delivery, trace.Span]:
        return await asyncio.wait_for(self.deliveries.get(), 5)


async def queue_of(transport: Transport, handler: Seen) -> str:
    name = await transport.declare_queue(QueueSpec(name="", exclusive=True, auto_delete=True))
    await transport.consume(name, handler, prefetch=10)
    return name


def no_sdk() -> Tracing:
    assert not trace.get_tracer_provider().get_tracer("probe").start_span("p").is_recording(), (
        "a test set the global tracer provider"
    )
    return Tracing()


def test_the_envelope_copy_keeps_every_field() -> None:
    values: dict[str, Any] = {
        "body": b"{}",
        "exchange": "agents",
        "routing_key": "echo",
        "content_type": "application/json",
        "type": "echo",
        "message_id": "m",
        "correlation_id": "c",
        "reply_to": "amq.gen-x",
        "priority": 3,
        "expiration_ms": 1000,
        "timestamp": 1,
        "headers": {"x-a": "b"},
        "persistent": False,
        "redelivered": True,
    }
    assert set(values) == {field.name for field in dataclasses.fields(Envelope)}
    envelope = Envelope(**values)
    span = NonRecordingSpan(SpanContext(TRACE_ID, PARENT_ID, False, TraceFlags(1)))

    carrying = _carrying(envelope, trace.set_span_in_context(span))

    assert carrying == dataclasses.replace(
        envelope, headers={"x-a": "b", "traceparent": TRACEPARENT}
    )
    assert envelope.headers == {"x-a": "b"}
    assert _carrying(envelope, otel_context.Context()) is envelope


async def test_without_an_sdk_nothing_is_injected_or_wrapped(transport: InMemoryTransport) -> None:
    traced, seen = no_sdk().wrap(transport), Seen()
    queue = await queue_of(traced, seen)

    await traced.publish(Envelope(b"{}", routing_key=queue, headers={"x-a": "b"}), timeout_s=1)

    delivery, span = await seen.next()
    assert not isinstance(delivery, TracedDelivery)
    assert delivery.envelope.headers == {"x-a": "b"}
    assert not span.get_span_context().is_valid


async def test_without_an_sdk_a_callers_trace_context_is_passed_on(
    transport: InMemoryTransport,
) -> None:
    traced, first, second = no_sdk().wrap(transport), Seen(), Seen()
    onward = await queue_of(transport, second)

    async def forward(delivery: Delivery) -> None:
        await first(delivery)
        await traced.publish(Envelope(b"{}", routing_key=onward), timeout_s=1)

    queue = await transport.declare_queue(QueueSpec(name="", exclusive=True, auto_delete=True))
    await traced.consume(queue, forward, prefetch=10)
    await transport.publish(
        Envelope(b"{}", routing_key=queue, headers={"traceparent": TRACEPARENT}), timeout_s=1
    )

    _, span = await first.next()
    forwarded, _ = await second.next()
    assert (span.get_span_context().trace_id, span.get_span_context().span_id) == (
        TRACE_ID,
        PARENT_ID,
    )
    assert forwarded.envelope.headers == {"traceparent": TRACEPARENT}


async def test_a_sampled_out_span_carries_its_decision_and_is_not_wrapped(
    transport: InMemoryTransport,
) -> None:
    tracing = Tracing(tracer_provider=TracerProvider(sampler=ALWAYS_OFF))
    traced, seen = tracing.wrap(transport), Seen()
    queue = await queue_of(traced, seen)

    await traced.publish(Envelope(b"{}", routing_key=queue), timeout_s=1)

    delivery, span = await seen.next()
    traceparent = (delivery.envelope.headers or {})["traceparent"]
    assert isinstance(traceparent, str)
    _, trace_id, _, flags = traceparent.split("-")
    assert not int(flags, 16) & TraceFlags.SAMPLED  # not sampled, and says so downstream
    assert f"{span.get_span_context().trace_id:032x}" == trace_id
    assert not isinstance(delivery, TracedDelivery)


def test_an_sdk_configured_after_tracing_is_built_gets_the_spans() -> None:
    """The global provider is asked per message until it is set (in a process of its own:
    the API lets it be set once)."""
    code = """
import asyncio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from amqp_agents.models.envelope import Envelope
from amqp_agents.tracing import Tracing
from amqp_agents.transport.memory import InMemoryBroker, InMemoryTransport

async def main():
    tracing = Tracing()
    async with InMemoryTransport(InMemoryBroker()) as transport:
        traced = tracing.wrap(transport)
        await traced.publish(Envelope(b"{}", routing_key="nowhere"), timeout_s=1)
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        await traced.publish(Envelope(b"{}", routing_key="nowhere"), timeout_s=1)
    assert [s.name for s in exporter.get_finished_spans()] == ["send nowhere"], (
        exporter.get_finished_spans()
    )

asyncio.run(main())
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
