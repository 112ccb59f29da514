"""Case 5: memory per pending RPC call, with ``n`` (100k) calls in flight at once.

The agent's queue exists but has no consumer, so no call is ever answered. The client
reads its RSS (``VmRSS``), starts ``n`` concurrent calls (timeout 1 h), waits until every
call is pending *and* every request is in the queue (all publishes confirmed), reads
RSS again: bytes per call = growth / ``n``. That includes each call's task and
coroutine, as any caller pays. Calls start in batches of 1000, each once the previous
batch is in the queue, so the figure is the steady state of waiting calls rather than
the transient peak of 100k publishes queued for one channel at once.

Each measurement runs in a fresh child process (``python -m benchmarks.cases.memory``),
not in the bench process: a heap that earlier cases grew and freed would absorb the
growth and report too little, differently for whichever side ran second.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import aio_pika
from pydantic import SecretStr

from amqp_agents import ConnectionSettings, RabbitTransport, RpcClient
from benchmarks.agents import EchoPayload, declare_agent_queue
from benchmarks.cases import Case, Metric, RunContext, Side, Target
from benchmarks.common import BenchError, echo_payload, rss_bytes, run_loop
from benchmarks.proc import ServerProcess, emit, stdin_closed
from benchmarks.rawclient import RawRpcClient

__all__ = ["CASES"]

CALL_TIMEOUT_S = 3600.0
BATCH = 1000
RUN_TIMEOUT_S = 1200.0

METRICS = (Metric("bytes_per_call", "bytes/pending call", higher_is_better=False),)


async def _measure(
    call: Callable[[], Coroutine[Any, Any, object]],
    pending: Callable[[], int],
    depth: Callable[[], Awaitable[int]],
    n: int,
) -> tuple[int, int, list[asyncio.Task[object]]]:
    """RSS before, RSS with ``n`` calls pending, and the calls' tasks.

    Calls start in batches of :data:`BATCH`, each batch once the previous one is
    published: the resident size then reflects calls *waiting for a reply*, not the
    transient peak of ``n`` messages queued for the channel at once.
    """
    gc.collect()
    before = rss_bytes()
    tasks: list[asyncio.Task[object]] = []
    ended: list[asyncio.Task[object]] = []
    async with asyncio.timeout(RUN_TIMEOUT_S):
        while len(tasks) < n:
            for _ in range(min(BATCH, n - len(tasks))):
                task = asyncio.create_task(call())
                task.add_done_callback(ended.append)
                tasks.append(task)
            while pending() < len(tasks) or await depth() < len(tasks):
                if ended:
                    raise BenchError(f"a call ended while it should be pending: {ended[0]!r}")
                await asyncio.sleep(0.01)
    gc.collect()
    return before, rss_bytes(), tasks


async def _delete_queue(url: str, queue: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue)


async def _ours(args: argparse.Namespace) -> dict[str, float]:
    transport = RabbitTransport(ConnectionSettings(url=SecretStr(args.url)))
    async with transport:
        queue = await declare_agent_queue(transport, args.name)
        # A burst of n publishes queues on one channel: the last waits for all the
        # others, so the per-publish bound must cover the whole burst.
        client = RpcClient(transport, publish_timeout_s=CALL_TIMEOUT_S)
        await client.start()
        payload = EchoPayload.model_validate(echo_payload())

        def call() -> Coroutine[Any, Any, object]:
            return client.send(args.name, "echo", payload, timeout_s=CALL_TIMEOUT_S)

        async def depth() -> int:
            return (await transport.queue_info(queue)).messages

        try:
            before, after, tasks = await _measure(call, lambda: client.pending_calls, depth, args.n)
        finally:
            await client.aclose()
        await asyncio.gather(*tasks)  # answered SHUTTING_DOWN by aclose()
    await _delete_queue(args.url, queue)
    return {"bytes_per_call": (after - before) / args.n, "rss_before": before, "rss_after": after}


async def _raw(args: argparse.Namespace) -> dict[str, float]:
    client = RawRpcClient(args.url)
    await client.start()
    try:
        queue = await client.declare_queue(args.name)
        payload = echo_payload()

        def call() -> Coroutine[Any, Any, object]:
            return client.call(args.name, payload, timeout_s=CALL_TIMEOUT_S)

        async def depth() -> int:
            return (await queue.declare()).message_count or 0

        before, after, tasks = await _measure(call, lambda: client.pending_calls, depth, args.n)
    finally:
        await client.aclose()
    await asyncio.gather(*tasks, return_exceptions=True)  # cancelled by aclose()
    await _delete_queue(args.url, args.name)
    return {"bytes_per_call": (after - before) / args.n, "rss_before": before, "rss_after": after}


async def _child(args: argparse.Namespace) -> None:
    emit("ready")
    run = _ours if args.kind == "ours" else _raw
    result = await run(args)
    emit("done", **result)
    await stdin_closed()


def _side(kind: str) -> Side:
    async def side(ctx: RunContext) -> dict[str, float]:
        args = ctx.child_args(kind, n=ctx.n)
        async with ServerProcess(
            f"memory {kind} {ctx.name}", "benchmarks.cases.memory", args
        ) as child:
            done = await child.event("done", timeout_s=RUN_TIMEOUT_S)
        return {"bytes_per_call": float(done["bytes_per_call"])}

    return side


CASES = (
    Case(
        id="memory",
        title="memory with 100k RPC calls pending",
        n=100_000,
        quick_n=10_000,
        metrics=METRICS,
        sides={"ours": _side("ours"), "raw": _side("raw")},
        targets=(Target("bytes_per_call", "<=", 1536, "absolute", " B"),),
    ),
)


def _main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cases.memory")
    parser.add_argument("kind", choices=["ours", "raw"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--uvloop", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    main: Coroutine[Any, Any, None] = _child(args)
    run_loop(main, use_uvloop=args.uvloop)


if __name__ == "__main__":
    _main()
