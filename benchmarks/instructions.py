"""Instructions per in-memory RPC call, counted by callgrind: a figure that does not
move with the machine's load (issue 20).

    python -m benchmarks.instructions            # RpcClient -> Worker, in memory
    python -m benchmarks.instructions --metrics  # the worker with a Metrics

Runs this module twice under ``valgrind --tool=callgrind`` (``--child N``: warm up with
2,000 calls, then make ``N``), with ``--short`` and ``--long`` calls, and prints
``(Ir(long) - Ir(short)) / (long - short)``: start-up and warm-up cancel out. Same
shape as the ``inmemory`` case (concurrency 100, the 200-byte echo), asyncio's loop.
Needs ``valgrind`` on ``PATH``; takes a minute or two.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
from pathlib import Path

from amqp_agents import RpcClient, Worker, WorkerSettings
from amqp_agents.metrics import Metrics
from amqp_agents.transport.memory import InMemoryBroker, InMemoryTransport
from benchmarks.agents import EchoAgent, EchoPayload
from benchmarks.common import BenchError, drive, echo_payload

CONCURRENCY = 100
REPO = Path(__file__).resolve().parents[1]
"""Where ``-m benchmarks.instructions`` runs from (also in a checkout of an older commit)."""
WARMUP = 2000


async def calls(n: int, *, metrics: bool) -> None:
    """Warm up, then make ``n`` in-memory round trips."""
    broker = InMemoryBroker()
    async with InMemoryTransport(broker) as server, InMemoryTransport(broker) as caller:
        worker = Worker(
            server,
            [EchoAgent(name="echo")],
            settings=WorkerSettings(concurrency=CONCURRENCY),
            metrics=Metrics() if metrics else None,
        )
        await worker.start()
        try:
            async with RpcClient(caller) as client:
                payload = EchoPayload.model_validate(echo_payload())

                async def call() -> None:
                    reply = await client.send("echo", "echo", payload)
                    if not reply.ok:
                        raise BenchError(f"error reply: {reply.error!r}")

                await drive(call, calls=WARMUP, concurrency=CONCURRENCY)
                await drive(call, calls=n, concurrency=CONCURRENCY)
        finally:
            await worker.stop()


def counted(n: int, *, metrics: bool) -> int:
    """Instructions callgrind counts for a child making ``n`` calls."""
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    command += [sys.executable, "-m", "benchmarks.instructions", "--child", str(n)]
    command += ["--metrics"] if metrics else []
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise BenchError(f"no instruction count in callgrind's output:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions")
    parser.add_argument("--metrics", action="store_true", help="the worker with a Metrics")
    parser.add_argument("--short", type=int, default=3000)
    parser.add_argument("--long", type=int, default=8000)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        asyncio.run(calls(args.child, metrics=args.metrics))
        return
    short, long = (
        counted(args.short, metrics=args.metrics),
        counted(args.long, metrics=args.metrics),
    )
    per_call = (long - short) / (args.long - args.short)
    what = "with a Metrics" if args.metrics else "no metrics"
    print(f"in-memory RPC, {what}: {per_call:,.0f} instructions per call")


if __name__ == "__main__":
    main()
