"""Case 4: RPC over the in-memory transport, concurrency 100, client and worker in-process.

This measures the library's own per-call cost with no broker and no sockets: an
:class:`~amqp_agents.transport.memory.InMemoryBroker` shared by two transports (the
client's and the worker's, like two connections), the worker hosting
:class:`~benchmarks.agents.EchoAgent` with concurrency 100.

Its ``raw`` side is the floor in the same run: a bare asyncio round trip over the
same hops (:func:`bare`), so the target is a ratio of CPU per call, which holds
across machines where an absolute rate does not.

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

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from amqp_agents import RpcClient, Worker, WorkerSettings
from amqp_agents.transport.memory import InMemoryBroker, InMemoryTransport
from benchmarks.agents import EchoAgent, EchoPayload
from benchmarks.cases import Case, Metric, RunContext, Side, Target
from benchmarks.cases.rpc import profiled
from benchmarks.common import BenchError, compact_json, drive, echo_payload, process_cpu_s

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


async def bare(ctx: RunContext) -> dict[str, float]:
    """A bare asyncio round trip over the same hops as ours, concurrency 100.

    The caller keys a future by a correlation id, JSON-encodes the request (the same
    200-byte payload) and puts it on the server's :class:`asyncio.Queue`; the server
    runs one task per request that decodes it, validates it with the same pydantic
    model as ours (:class:`~benchmarks.agents.EchoPayload`), encodes the reply and
    puts it on the caller's queue; the caller's reader decodes it and resolves the
    future. Two tasks per call (the caller's and the handler's), a future, JSON both
    ways, one validation: what any RPC over a transport must do at least.
    """
    loop = asyncio.get_running_loop()
    requests: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    replies: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    pending: dict[str, asyncio.Future[Any]] = {}
    ids = itertools.count()

    async def handle(correlation_id: str, body: bytes) -> None:
        payload = EchoPayload.model_validate(json.loads(body))
        reply = compact_json({"ok": True, "data": payload.model_dump()})
        replies.put_nowait((correlation_id, reply))

    async def server() -> None:
        async with asyncio.TaskGroup() as handlers:
            while True:
                correlation_id, body = await requests.get()
                handlers.create_task(handle(correlation_id, body))

    async def reader() -> None:
        while True:
            correlation_id, body = await replies.get()
            future = pending.pop(correlation_id, None)
            if future is not None and not future.done():
                future.set_result(json.loads(body))

    payload = echo_payload()

    async def call() -> None:
        correlation_id = str(next(ids))
        future: asyncio.Future[Any] = loop.create_future()
        pending[correlation_id] = future
        try:
            requests.put_nowait((correlation_id, compact_json(payload)))
            reply = await future
        finally:
            pending.pop(correlation_id, None)
        if not reply["ok"]:
            raise BenchError(f"error reply: {reply!r}")

    tasks = [asyncio.create_task(server()), asyncio.create_task(reader())]
    try:
        await drive(call, calls=ctx.warmup, concurrency=CONCURRENCY)
        result = await drive(call, calls=ctx.n, concurrency=CONCURRENCY)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
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
    case_id: str,
    title: str,
    sides: Mapping[str, Side | str],
    metrics: tuple[Metric, ...] = _METRICS,
    **more: Any,
) -> Case:
    """An in-memory case: 20,000 calls (2,000 with --quick)."""
    return Case(
        id=case_id,
        title=title,
        n=20_000,
        quick_n=2000,
        metrics=metrics,
        sides=sides,
        **more,
    )


CASES = (
    _case(
        "inmemory",
        "in-memory transport RPC, concurrency 100 (raw: bare asyncio, same hops)",
        {"ours": ours, "raw": bare},
        targets=(Target("cpu_us", "<=", 2.0, "raw"),),
    ),
    _case(
        "inmemory.otel-api",
        "in-memory RPC, tracing on, no OpenTelemetry SDK configured",
        {"ours": traced(_api_only)},
    ),
    _case(
        "inmemory.otel-sdk",
        "in-memory RPC, tracing on, SDK recording every span (no export)",
        {"ours": traced(_sdk)},
    ),
    _case(
        "inmemory.otel-floor",
        "no RPC: the OpenTelemetry SDK's own work for one traced call's spans",
        {"ours": sdk_floor},
        _FLOOR_METRICS,
    ),
)
