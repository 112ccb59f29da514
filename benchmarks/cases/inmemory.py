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
The plain case passes no ``Tracing`` at all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from amqp_agents import RpcClient, Worker, WorkerSettings
from amqp_agents.transport.memory import InMemoryBroker, InMemoryTransport
from benchmarks.agents import EchoAgent, EchoPayload
from benchmarks.cases import Case, Metric, RunContext, Target
from benchmarks.cases.rpc import profiled
from benchmarks.common import BenchError, drive, echo_payload

if TYPE_CHECKING:
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


def traced(make: Callable[[], Tracing]) -> Callable[[RunContext], Awaitable[dict[str, float]]]:
    async def side(ctx: RunContext) -> dict[str, float]:
        return await ours(ctx, make())

    return side


_METRICS = (
    Metric("calls_per_s", "calls/s", higher_is_better=True),
    Metric("cpu_us", "CPU us/call (client+worker)", higher_is_better=False),
)

CASES = (
    Case(
        id="inmemory",
        title="in-memory transport RPC, concurrency 100",
        n=20_000,
        quick_n=2000,
        metrics=(
            Metric("calls_per_s", "calls/s", higher_is_better=True),
            Metric("cpu_us", "CPU us/call (client+worker)", higher_is_better=False),
        ),
        sides={"ours": ours},
        targets=(Target("calls_per_s", ">=", 50_000, "absolute", " calls/s"),),
    ),
    Case(
        id="inmemory.otel-api",
        title="in-memory RPC, tracing on, no OpenTelemetry SDK configured",
        n=20_000,
        quick_n=2000,
        metrics=_METRICS,
        sides={"ours": traced(_api_only)},
    ),
    Case(
        id="inmemory.otel-sdk",
        title="in-memory RPC, tracing on, SDK recording every span (no export)",
        n=20_000,
        quick_n=2000,
        metrics=_METRICS,
        sides={"ours": traced(_sdk)},
    ),
)
