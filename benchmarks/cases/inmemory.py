"""Case 4: RPC over the in-memory transport, concurrency 100, client and worker in-process.

This measures the library's own per-call cost with no broker and no sockets: an
:class:`~amqp_agents.transport.memory.InMemoryBroker` shared by two transports (the
client's and the worker's, like two connections), the worker hosting
:class:`~benchmarks.agents.EchoAgent` with concurrency 100.
"""

from __future__ import annotations

from amqp_agents import RpcClient, Worker, WorkerSettings
from amqp_agents.transport.memory import InMemoryBroker, InMemoryTransport
from benchmarks.agents import EchoAgent, EchoPayload
from benchmarks.cases import Case, Metric, RunContext, Target
from benchmarks.cases.rpc import profiled
from benchmarks.common import BenchError, drive, echo_payload

__all__ = ["CASES"]

CONCURRENCY = 100


async def ours(ctx: RunContext) -> dict[str, float]:
    """RpcClient and Worker on one in-memory broker."""
    broker = InMemoryBroker()
    async with InMemoryTransport(broker) as server, InMemoryTransport(broker) as caller:
        worker = Worker(
            server, [EchoAgent(name=ctx.name)], settings=WorkerSettings(concurrency=CONCURRENCY)
        )
        await worker.start()
        try:
            async with RpcClient(caller) as client:
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
)
