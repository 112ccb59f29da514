"""Case 1: RPC round trips of a 200-byte JSON payload, at concurrency 1 and 100.

* ours: :meth:`RpcClient.send` to a :class:`~amqp_agents.Worker` hosting
  :class:`~benchmarks.agents.EchoAgent` (concurrency = prefetch = 100);
* raw: :class:`~benchmarks.rawclient.RawRpcClient` to ``raw-echo`` (prefetch 100);
* faststream: ``broker.request`` to a subscriber returning its body (prefetch 100).

Requests are transient (delivery mode 1) on every side in ``rpc.c1`` and
``rpc.c100`` (ours with ``RpcSettings(persistent=False)``), as a hand-written
baseline publishes them; ``rpc.c100.persistent`` sends them persistent (delivery
mode 2) on every side, ours' default. Replies are transient everywhere.

Each repetition starts a fresh server process, warms up with ``warmup`` calls, then
times ``n`` calls from ``concurrency`` concurrent loops.
"""

from __future__ import annotations

import contextlib
import cProfile
import time
from collections.abc import Iterator

from pydantic import SecretStr

from amqp_agents import ConnectionSettings, RabbitTransport, RpcClient, RpcSettings
from benchmarks.agents import EchoPayload
from benchmarks.cases import Case, Metric, RunContext, Side, Target
from benchmarks.common import BenchError, drive, echo_payload
from benchmarks.proc import ServerProcess
from benchmarks.rawclient import RawRpcClient

__all__ = ["CASES", "profiled"]

RUN_TIMEOUT_S = 1800.0

METRICS = (
    Metric("calls_per_s", "calls/s", higher_is_better=True),
    Metric("p50_ms", "p50 latency ms", higher_is_better=False),
    Metric("p99_ms", "p99 latency ms", higher_is_better=False),
    Metric("client_cpu_us", "client CPU us/call", higher_is_better=False),
    Metric("server_cpu_us", "server CPU us/call", higher_is_better=False),
    Metric("broker_cpu_us", "broker CPU us/call", higher_is_better=False),
)


@contextlib.contextmanager
def profiled(ctx: RunContext, role: str) -> Iterator[None]:
    """cProfile the block into ``<profile_dir>/<name>-<role>.prof`` when profiling."""
    if ctx.profile_dir is None:
        yield
        return
    profiler = cProfile.Profile(time.process_time)  # CPU time: fair on a loaded machine
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        profiler.dump_stats(ctx.profile_dir / f"{ctx.name}-{role}.prof")


def server_profile_args(ctx: RunContext) -> list[str]:
    """``--profile PATH`` for the ours server when profiling."""
    if ctx.profile_dir is None:
        return []
    return ["--profile", str(ctx.profile_dir / f"{ctx.name}-server.prof")]


def _sides(concurrency: int, *, persistent: bool) -> dict[str, Side]:
    async def ours(ctx: RunContext) -> dict[str, float]:
        args = ctx.child_args("ours-echo", prefetch=100) + server_profile_args(ctx)
        async with ServerProcess(f"ours-echo {ctx.name}", "benchmarks.servers", args) as server:
            transport = RabbitTransport(ConnectionSettings(url=SecretStr(ctx.url)))
            settings = RpcSettings(persistent=persistent)
            async with transport, RpcClient(transport, settings=settings) as client:
                payload = EchoPayload.model_validate(echo_payload())

                async def call() -> None:
                    reply = await client.send(ctx.name, "echo", payload)
                    if not reply.ok:
                        raise BenchError(f"error reply: {reply.error!r}")

                await drive(call, calls=ctx.warmup, concurrency=concurrency)
                with profiled(ctx, "client"):
                    result = await drive(
                        call,
                        calls=ctx.n,
                        concurrency=concurrency,
                        server_pid=server.pid,
                        broker_pid=ctx.broker_pid,
                    )
        return result.metrics()

    async def raw(ctx: RunContext) -> dict[str, float]:
        args = ctx.child_args("raw-echo", prefetch=100)
        async with ServerProcess(f"raw-echo {ctx.name}", "benchmarks.servers", args) as server:
            client = RawRpcClient(ctx.url, persistent=persistent)
            await client.start()
            try:
                payload = echo_payload()

                async def call() -> None:
                    await client.call(ctx.name, payload)

                await drive(call, calls=ctx.warmup, concurrency=concurrency)
                result = await drive(
                    call,
                    calls=ctx.n,
                    concurrency=concurrency,
                    server_pid=server.pid,
                    broker_pid=ctx.broker_pid,
                )
            finally:
                await client.aclose()
        return result.metrics()

    async def faststream(ctx: RunContext) -> dict[str, float]:
        setup = ctx.faststream
        assert setup is not None
        args = ctx.child_args("faststream-echo", prefetch=100)
        async with ServerProcess(
            f"faststream-echo {ctx.name}", "benchmarks.servers", args, python=setup.python
        ) as server:
            if setup.in_process:
                from benchmarks.faststream_side import rpc_client

                return await rpc_client(
                    ctx.url,
                    ctx.name,
                    calls=ctx.n,
                    concurrency=concurrency,
                    warmup=ctx.warmup,
                    persistent=persistent,
                    server_pid=server.pid,
                    broker_pid=ctx.broker_pid,
                )
            client_args = ctx.child_args(
                "client-rpc",
                n=ctx.n,
                concurrency=concurrency,
                warmup=ctx.warmup,
                server_pid=server.pid,
                **({} if ctx.broker_pid is None else {"broker_pid": ctx.broker_pid}),
            )
            async with ServerProcess(
                f"faststream client {ctx.name}",
                "benchmarks.faststream_side",
                client_args + (["--persistent"] if persistent else []),
                python=setup.python,
            ) as client:
                done = await client.event("done", timeout_s=RUN_TIMEOUT_S)
        return {metric.key: float(done[metric.key]) for metric in METRICS if metric.key in done}

    return {"ours": ours, "raw": raw, "faststream": faststream}


CASES = (
    Case(
        id="rpc.c1",
        title="RPC round trip, 200 B, concurrency 1, transient requests",
        n=2000,
        quick_n=200,
        metrics=METRICS,
        sides=_sides(concurrency=1, persistent=False),
        targets=(Target("p50_ms", "<=", 1.0, "raw"),),
    ),
    Case(
        id="rpc.c100",
        title="RPC round trip, 200 B, concurrency 100, transient requests",
        n=20_000,
        quick_n=2000,
        metrics=METRICS,
        sides=_sides(concurrency=100, persistent=False),
        targets=(
            Target("calls_per_s", ">=", 1.5, "raw"),
            Target("calls_per_s", ">=", 5.0, "faststream"),
        ),
    ),
    Case(
        id="rpc.c100.persistent",
        title="RPC round trip, 200 B, concurrency 100, persistent requests",
        n=20_000,
        quick_n=2000,
        metrics=METRICS,
        sides=_sides(concurrency=100, persistent=True),
    ),
)
