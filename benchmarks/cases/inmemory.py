"""Case 4: RPC over the in-memory transport, concurrency 100, client and worker in-process.

This measures the library's own per-call cost with no broker and no sockets: an
:class:`~amqp_agents.transport.memory.InMemoryBroker` shared by two transports (the
client's and the worker's, like two connections), the worker hosting
:class:`~benchmarks.agents.EchoAgent` with concurrency 100.

Its ``otel-*`` variants measure what tracing costs (issue 16), with the ``otel`` extra
installed: ``otel-api`` gives the client and worker a ``Tracing`` on the OpenTelemetry
API's default provider (no SDK configured: spans are not recorded), ``otel-sdk`` one on
an SDK ``TracerProvider`` that records every span (sampled) and hands it to a span
processor that drops it, so export costs nothing and only the spans' making is counted.
The plain case passes no ``Tracing`` at all. ``otel-floor`` is no RPC at all: the
SDK's own work for the spans of one traced call, done back to back (five spans with the
attributes ours carry, chained as in a call, the call and process spans made current,
two injections and one extraction of ``traceparent``), what ``otel-sdk`` cannot go
below on top of ``inmemory``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from amqp_agents import RpcClient, Worker, WorkerSettings
from amqp_agents.transport.memory import InMemoryBroker, InMemoryTransport
from benchmarks.agents import EchoAgent, EchoPayload
from benchmarks.cases import Case, Metric, RunContext, Side, Target
from benchmarks.cases.rpc import profiled
from benchmarks.common import BenchError, drive, echo_payload, process_cpu_s

if TYPE_CHECKING:
    from opentelemetry.util.types import AttributeValue

    from amqp_agents.tracing import Tracing

__all__ = ["CASES"]

CONCURRENCY = 100


async def ours(ctx: RunContext, tracing: Tracing | None = None) -> dict[str, float]:
    """RpcClient and Worker on one in-memory broker."""
    broker = InMemoryBroker()
    async with InMemoryTransport(broker) as server, InMemoryTransport(broker) as caller:
        worker = Worker(
            server,
            [EchoAgent(name=ctx.name)],
            settings=WorkerSettings(concurrency=CONCURRENCY),
            tracing=tracing,
        )
        await worker.start()
        try:
            async with RpcClient(caller, tracing=tracing) as client:
                payload = EchoPayload.model_validate(echo_payload())

                async def call() -> None:
                    reply = await client.send(ctx.name, "echo", payload)
                    if not reply.ok:
                        raise BenchError(f"error reply: {reply.error!r}")

                await drive(call, calls=ctx.warmup, concurrency=CONCURRENCY)
                with profiled(ctx, "inmemory"):
                    result = await drive(call, calls=ctx.n, concurrency=CONCURRENCY)
        finally:
            await worker.stop()
    metrics = result.metrics()
    return {"calls_per_s": metrics["calls_per_s"], "cpu_us": metrics["client_cpu_us"]}


def _api_only() -> Tracing:
    from amqp_agents.tracing import Tracing

    return Tracing()  # the API's global provider: a no-op, no SDK is configured here


def _sdk() -> Tracing:
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

    from amqp_agents.tracing import Tracing

    provider = TracerProvider()
    provider.add_span_processor(SpanProcessor())  # records, drops: no export cost
    return Tracing(tracer_provider=provider)


async def sdk_floor(ctx: RunContext) -> dict[str, float]:
    """The OpenTelemetry SDK's part of one traced call, ``ctx.n`` times (see above)."""
    from opentelemetry import context, propagate, trace
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.trace import SpanKind

    provider = TracerProvider()
    provider.add_span_processor(SpanProcessor())
    tracer = provider.get_tracer("floor")
    ids = {"messaging.message.id": "c" * 32, "messaging.message.conversation_id": "c" * 32}
    message: dict[str, AttributeValue] = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": "agents:echo",
        "messaging.rabbitmq.destination.routing_key": "echo",
        "messaging.message.body.size": 200,
        **ids,
    }
    call_attributes: dict[str, AttributeValue] = {
        "rpc.system.name": "amqp_agents",
        "rpc.method": "echo/echo",
        "messaging.system": "rabbitmq",
    }
    settle: dict[str, AttributeValue] = {
        **message,
        "messaging.operation.type": "settle",
        "messaging.operation.name": "ack",
    }
    del settle["messaging.message.body.size"]
    reply: dict[str, AttributeValue] = {
        **message,
        "messaging.destination.anonymous": True,
        "messaging.destination.temporary": True,
    }

    def one() -> None:
        call = tracer.start_span("echo/echo", None, SpanKind.CLIENT, call_attributes)
        calling = trace.set_span_in_context(call)
        token = context.attach(calling)
        send = tracer.start_span("send agents:echo", calling, SpanKind.PRODUCER, message)
        headers: dict[str, str] = {}
        propagate.inject(headers, trace.set_span_in_context(send, calling))
        send.end()
        parent = propagate.extract(headers, context.Context())
        process = tracer.start_span("process agents:echo", parent, SpanKind.CONSUMER, message)
        processing = trace.set_span_in_context(process, parent)
        inner = context.attach(processing)
        answer = tracer.start_span("send", processing, SpanKind.PRODUCER, reply)
        propagate.inject({}, trace.set_span_in_context(answer, processing))
        answer.end()
        tracer.start_span("ack agents:echo", processing, SpanKind.CLIENT, settle).end()
        context.detach(inner)
        process.end()
        context.detach(token)
        call.end()

    for _ in range(ctx.warmup):
        one()
    cpu, started = process_cpu_s(), time.perf_counter()
    for _ in range(ctx.n):
        one()
    elapsed, cpu = time.perf_counter() - started, process_cpu_s() - cpu
    return {"calls_per_s": ctx.n / elapsed, "cpu_us": cpu / ctx.n * 1e6}


def traced(make: Callable[[], Tracing]) -> Callable[[RunContext], Awaitable[dict[str, float]]]:
    async def side(ctx: RunContext) -> dict[str, float]:
        return await ours(ctx, make())

    return side


_METRICS = (
    Metric("calls_per_s", "calls/s", higher_is_better=True),
    Metric("cpu_us", "CPU us/call (client+worker)", higher_is_better=False),
)
_FLOOR_METRICS = (
    Metric("calls_per_s", "traced calls' spans/s", higher_is_better=True),
    Metric("cpu_us", "CPU us/call (the SDK's part)", higher_is_better=False),
)


def _case(
    case_id: str, title: str, side: Side, metrics: tuple[Metric, ...] = _METRICS, **more: Any
) -> Case:
    """An in-memory case: 20,000 calls (2,000 with --quick), our side only."""
    return Case(
        id=case_id,
        title=title,
        n=20_000,
        quick_n=2000,
        metrics=metrics,
        sides={"ours": side},
        **more,
    )


CASES = (
    _case(
        "inmemory",
        "in-memory transport RPC, concurrency 100",
        ours,
        targets=(Target("calls_per_s", ">=", 50_000, "absolute", " calls/s"),),
    ),
    _case(
        "inmemory.otel-api",
        "in-memory RPC, tracing on, no OpenTelemetry SDK configured",
        traced(_api_only),
    ),
    _case(
        "inmemory.otel-sdk",
        "in-memory RPC, tracing on, SDK recording every span (no export)",
        traced(_sdk),
    ),
    _case(
        "inmemory.otel-floor",
        "no RPC: the OpenTelemetry SDK's own work for one traced call's spans",
        sdk_floor,
        _FLOOR_METRICS,
    ),
)
