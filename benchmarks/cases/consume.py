"""Case 3: a worker draining a pre-filled queue of fire-and-forget requests.

The bench process declares the side's request queue (ours as its worker would, raw
durable with ``x-max-priority``) and
fills it with ``n`` 200-byte requests without ``reply_to`` (ours with
:meth:`RpcClient.notify`, raw with the same AMQP properties), checks the depth, then
starts the server. The server reports when it has handled ``n``; the rate is
``(n - 1)`` over the time from its first to its last handled message, so process start
and connection set-up are not counted.

* ours: a :class:`~amqp_agents.Worker` (concurrency = prefetch = 100), ack after handling;
* raw: an aio-pika consumer with prefetch 100 that decodes the JSON and acks each one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from pydantic import SecretStr

from amqp_agents import ConnectionSettings, RabbitTransport, RpcClient
from benchmarks.agents import EchoPayload, declare_agent_queue
from benchmarks.cases import Case, Metric, RunContext, Side
from benchmarks.common import BenchError, CpuWindow, drive, echo_payload
from benchmarks.proc import ServerProcess
from benchmarks.rawclient import RawRpcClient

__all__ = ["CASES"]

PUBLISHERS = 100
REQUEST_TTL_S = 3600.0
RUN_TIMEOUT_S = 900.0

METRICS = (
    Metric("msgs_per_s", "handled/s", higher_is_better=True),
    Metric("broker_cpu_us", "broker CPU us/message", higher_is_better=False),
)


async def _drain(ctx: RunContext, kind: str, expected: int) -> dict[str, float]:
    args = ctx.child_args(kind, n=ctx.n, prefetch=100)
    # The broker's CPU from the server's start to its last message: its connection
    # set-up is in it, small beside delivering n messages.
    broker = CpuWindow(ctx.broker_pid)
    async with ServerProcess(f"{kind} {ctx.name}", "benchmarks.servers", args) as server:
        done = await server.event("done", timeout_s=RUN_TIMEOUT_S)
        broker_cpu = broker.used_s()
    if int(done["count"]) != expected:
        raise BenchError(f"{kind} handled {done['count']}, expected {expected}")
    measured = {"msgs_per_s": (ctx.n - 1) / ((done["last_ns"] - done["first_ns"]) / 1e9)}
    if broker_cpu is not None:
        measured["broker_cpu_us"] = broker_cpu / ctx.n * 1e6
    return measured


async def _wait_depth(depth: Callable[[], Awaitable[int]], expected: int) -> None:
    async with asyncio.timeout(60):
        while (found := await depth()) != expected:
            if found > expected:
                raise BenchError(f"queue holds {found} messages, expected {expected}")
            await asyncio.sleep(0.1)


async def ours(ctx: RunContext) -> dict[str, float]:
    """Fill ``agents.<name>`` with :meth:`RpcClient.notify`, then time the worker."""
    transport = RabbitTransport(ConnectionSettings(url=SecretStr(ctx.url)))
    async with transport, RpcClient(transport) as client:
        queue = await declare_agent_queue(transport, ctx.name)
        payload = EchoPayload.model_validate(echo_payload())

        async def notify() -> None:
            await client.notify(ctx.name, "echo", payload, timeout_s=REQUEST_TTL_S)

        await drive(notify, calls=ctx.n, concurrency=PUBLISHERS)

        async def depth() -> int:
            return (await transport.queue_info(queue)).messages

        await _wait_depth(depth, ctx.n)
    return await _drain(ctx, "ours-drain", ctx.n)


async def raw(ctx: RunContext) -> dict[str, float]:
    """Fill the raw queue with the same requests by hand, then time the consumer."""
    client = RawRpcClient(ctx.url)
    await client.start()
    try:
        queue = await client.declare_queue(ctx.name)
        payload = echo_payload()

        async def notify() -> None:
            await client.notify(ctx.name, payload, ttl_s=REQUEST_TTL_S)

        await drive(notify, calls=ctx.n, concurrency=PUBLISHERS)

        async def depth() -> int:
            return (await queue.declare()).message_count or 0

        await _wait_depth(depth, ctx.n)
    finally:
        await client.aclose()
    return await _drain(ctx, "raw-drain", ctx.n)


SIDES: dict[str, Side | str] = {"ours": ours, "raw": raw}

CASES = (
    Case(
        id="consume",
        title="worker drains a pre-filled queue (fire-and-forget)",
        n=20_000,
        quick_n=2000,
        metrics=METRICS,
        sides=SIDES,
    ),
)
