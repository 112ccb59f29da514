"""Case 2: events published to a topic exchange, delivered to 1 and to 3 groups.

Every group is a durable queue bound with :data:`~benchmarks.common.EVENT_BINDING`
and consumed (prefetch :data:`PREFETCH` on every side, acked) in the side's server
process. Two phases per repetition, both with persistent 200-byte events and
publisher confirms awaited:

1. throughput: ``n`` (20,000) events from 100 concurrent publish loops; delivered/s
   is ``n * groups`` over the time from the first publish to the last delivery;
   the publish rate is ``n`` over the time from the first publish to the last
   confirm; the broker's CPU is read over the same window as delivered/s;
2. latency: ``max(100, n/10)`` probe events published one at a time, once the burst
   is delivered; each carries its publish time (``time.monotonic_ns()``, a
   system-wide clock) and the subscriber measures publish-to-handler latency. Timed
   apart from the burst, it is not just the time spent queued behind it.

* ours: :meth:`EventBus.publish` / :meth:`EventBus.subscribe` with ``group=``;
* raw: aio-pika, one channel per group, JSON with the standard library;
* faststream: ``broker.publish`` / one ``@broker.subscriber`` per group.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable

import aio_pika
from pydantic import SecretStr

from amqp_agents import ConnectionSettings, EventBus, RabbitTransport, Topology
from benchmarks.cases import Case, Metric, RunContext, Side, Target
from benchmarks.cases.rpc import profiled, server_profile_args
from benchmarks.common import (
    EVENT_ROUTING_KEY,
    CpuWindow,
    Published,
    compact_json,
    drive,
    event_payload,
    process_cpu_s,
)
from benchmarks.proc import ServerProcess

__all__ = ["CASES"]

PUBLISHERS = 100
"""Concurrent publish loops in the bench process during the throughput phase."""
PREFETCH = 1000
"""Unacked deliveries per group's consumer, on every side (ours: the EventBus's)."""
RUN_TIMEOUT_S = 900.0

METRICS = (
    Metric("delivered_per_s", "delivered/s", higher_is_better=True),
    Metric("published_per_s", "published/s (confirmed)", higher_is_better=True),
    Metric("p50_ms", "p50 latency ms (probes)", higher_is_better=False),
    Metric("p99_ms", "p99 latency ms (probes)", higher_is_better=False),
    Metric("publisher_cpu_us", "publisher CPU us/event", higher_is_better=False),
    Metric("subscriber_cpu_us", "subscriber CPU us/delivery", higher_is_better=False),
    Metric("broker_cpu_us", "broker CPU us/delivery", higher_is_better=False),
)

Burst = Callable[[int], Awaitable[Published]]
"""Publish n events from :data:`PUBLISHERS` loops, each confirmed."""
Probe = Callable[[int], Awaitable[None]]
"""Publish n probe events one at a time."""


def _probes(ctx: RunContext) -> int:
    return max(100, ctx.n // 10)


async def _phases(
    server: ServerProcess, ctx: RunContext, groups: int, burst: Burst, probe: Probe
) -> dict[str, float]:
    """The throughput burst, then (once it is all delivered) the latency probes."""
    deliveries = ctx.n * groups
    server_cpu = process_cpu_s(server.pid)
    broker = CpuWindow(ctx.broker_pid)
    published = await burst(ctx.n)
    done = await server.event("done", timeout_s=RUN_TIMEOUT_S)
    server_cpu = process_cpu_s(server.pid) - server_cpu
    broker_cpu = broker.used_s()
    await probe(_probes(ctx))
    probed = await server.event("probed", timeout_s=RUN_TIMEOUT_S)
    measured = {
        "delivered_per_s": deliveries / ((done["last_ns"] - published.started_ns) / 1e9),
        "published_per_s": ctx.n / ((published.ended_ns - published.started_ns) / 1e9),
        "p50_ms": float(probed["p50_ms"]),
        "p99_ms": float(probed["p99_ms"]),
        "publisher_cpu_us": published.cpu_s / ctx.n * 1e6,
        "subscriber_cpu_us": server_cpu / deliveries * 1e6,
    }
    if broker_cpu is not None:
        measured["broker_cpu_us"] = broker_cpu / deliveries * 1e6
    return measured


def _publishers(publish: Callable[[bool], Awaitable[None]]) -> tuple[Burst, Probe]:
    async def burst(n: int) -> Published:
        started = time.monotonic_ns()
        result = await drive(lambda: publish(False), calls=n, concurrency=PUBLISHERS)
        return Published(started, time.monotonic_ns(), result.cpu_s)

    async def probe(n: int) -> None:
        await drive(lambda: publish(True), calls=n, concurrency=1)

    return burst, probe


def _sides(groups: int) -> dict[str, Side]:
    def server_args(ctx: RunContext, kind: str) -> list[str]:
        return ctx.child_args(kind, n=ctx.n, groups=groups, probes=_probes(ctx), prefetch=PREFETCH)

    async def ours(ctx: RunContext) -> dict[str, float]:
        args = server_args(ctx, "ours-events") + server_profile_args(ctx)
        async with ServerProcess(f"ours-events {ctx.name}", "benchmarks.servers", args) as server:
            transport = RabbitTransport(ConnectionSettings(url=SecretStr(ctx.url)))
            async with transport:
                bus = EventBus(transport, topology=Topology(events_exchange=ctx.name))
                await bus.start()
                seq = itertools.count()

                async def publish(probe: bool) -> None:
                    payload = event_payload(time.monotonic_ns(), next(seq), probe=probe)
                    await bus.publish(EVENT_ROUTING_KEY, payload)

                try:
                    with profiled(ctx, "client"):
                        return await _phases(server, ctx, groups, *_publishers(publish))
                finally:
                    await bus.aclose()

    async def raw(ctx: RunContext) -> dict[str, float]:
        args = server_args(ctx, "raw-events")
        async with ServerProcess(f"raw-events {ctx.name}", "benchmarks.servers", args) as server:
            connection = await aio_pika.connect(ctx.url)
            async with connection:
                channel = await connection.channel(publisher_confirms=True)
                exchange = await channel.declare_exchange(
                    ctx.name, aio_pika.ExchangeType.TOPIC, durable=True
                )
                seq = itertools.count()

                async def publish(probe: bool) -> None:
                    payload = event_payload(time.monotonic_ns(), next(seq), probe=probe)
                    await exchange.publish(
                        aio_pika.Message(
                            compact_json(payload),
                            content_type="application/json",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        routing_key=EVENT_ROUTING_KEY,
                    )

                return await _phases(server, ctx, groups, *_publishers(publish))

    async def faststream(ctx: RunContext) -> dict[str, float]:
        setup = ctx.faststream
        assert setup is not None
        args = server_args(ctx, "faststream-events")

        async def client(n: int, *, probe: bool) -> Published:
            concurrency = 1 if probe else PUBLISHERS
            if setup.in_process:
                from benchmarks.faststream_side import events_client

                return await events_client(
                    ctx.url, ctx.name, events=n, concurrency=concurrency, probe=probe
                )
            client_args = ctx.child_args("client-events", n=n, concurrency=concurrency)
            async with ServerProcess(
                f"faststream publisher {ctx.name}",
                "benchmarks.faststream_side",
                client_args + (["--probe"] if probe else []),
                python=setup.python,
            ) as publisher:
                done = await publisher.event("done", timeout_s=RUN_TIMEOUT_S)
            return Published(int(done["started_ns"]), int(done["ended_ns"]), float(done["cpu_s"]))

        async def burst(n: int) -> Published:
            return await client(n, probe=False)

        async def probe(n: int) -> None:
            await client(n, probe=True)

        async with ServerProcess(
            f"faststream-events {ctx.name}", "benchmarks.servers", args, python=setup.python
        ) as server:
            return await _phases(server, ctx, groups, burst, probe)

    return {"ours": ours, "raw": raw, "faststream": faststream}


def _case(groups: int) -> Case:
    return Case(
        id=f"events.g{groups}",
        title=f"events, delivered to {groups} group{'s' if groups > 1 else ''}",
        n=20_000,
        quick_n=2000,
        metrics=METRICS,
        sides=_sides(groups),
        targets=(Target("delivered_per_s", ">=", 1.2, "raw"),),
    )


CASES = (_case(1), _case(3))
