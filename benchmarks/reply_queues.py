"""What a reply queue costs the broker: raw RPC with an exclusive reply queue against
the same client with RabbitMQ's direct reply-to (``amq.rabbitmq.reply-to``) (issue 20).

Both sides are :class:`~benchmarks.rawclient.RawRpcClient` calling the raw echo server
(``raw-echo``) at concurrency 100 with transient requests; only the reply path
differs. Each repetition runs both, alternating, each against a fresh server process;
calls/s and client, server and broker CPU per call are printed with medians. This is
the experiment behind the README's "what it would take" for issue 20's 1.5x target,
not a case of the harness (ours has no direct reply-to).

    python -m benchmarks.reply_queues --reps 3 --calls 20000
"""

from __future__ import annotations

import argparse
import statistics

from amqp_agents.testing import BrokerAdmin, url_for_vhost
from benchmarks.common import drive, echo_payload, find_broker_pid, run_loop
from benchmarks.proc import ServerProcess
from benchmarks.rawclient import RawRpcClient

CONCURRENCY = 100
KEYS = ("calls_per_s", "client_cpu_us", "server_cpu_us", "broker_cpu_us")


async def one(
    url: str, name: str, calls: int, broker_pid: int | None, *, direct: bool
) -> dict[str, float]:
    """One repetition of one side: a fresh raw echo server, warm-up, ``calls`` calls."""
    args = ["raw-echo", "--url", url, "--name", name, "--prefetch", "100", "--uvloop"]
    async with ServerProcess(f"raw-echo {name}", "benchmarks.servers", args) as server:
        client = RawRpcClient(url, persistent=False, direct=direct)
        await client.start()
        try:
            payload = echo_payload()

            async def call() -> None:
                await client.call(name, payload)

            await drive(call, calls=min(calls // 10, 1000), concurrency=CONCURRENCY)
            result = await drive(
                call,
                calls=calls,
                concurrency=CONCURRENCY,
                server_pid=server.pid,
                broker_pid=broker_pid,
            )
        finally:
            await client.aclose()
    return result.metrics()


async def main(args: argparse.Namespace) -> None:
    broker_pid, why = find_broker_pid(args.url)
    if broker_pid is None:
        print(f"broker CPU not measured: {why}")
    admin = BrokerAdmin()
    vhost = admin.create_vhost("amqp-agents-bench")
    try:
        url = url_for_vhost(args.url, vhost)
        runs: dict[str, list[dict[str, float]]] = {"exclusive": [], "direct": []}
        for rep in range(args.reps):
            for side in runs:
                name = f"rq-{side}-{rep}"
                metrics = await one(url, name, args.calls, broker_pid, direct=side == "direct")
                runs[side].append(metrics)
                shown = ", ".join(f"{key} {metrics.get(key, float('nan')):,.1f}" for key in KEYS)
                print(f"rep {rep + 1} {side}: {shown}", flush=True)
        ratios = [
            d["calls_per_s"] / e["calls_per_s"]
            for e, d in zip(runs["exclusive"], runs["direct"], strict=True)
        ]
        for side, results in runs.items():
            medians = {
                key: statistics.median(run[key] for run in results)
                for key in KEYS
                if all(key in run for run in results)
            }
            print(f"median {side}: " + ", ".join(f"{k} {v:,.1f}" for k, v in medians.items()))
        ratio = statistics.median(ratios)
        print(f"direct / exclusive calls/s, median of per-rep ratios: {ratio:.2f}x")
    finally:
        admin.delete_vhost(vhost)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reply_queues")
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--calls", type=int, default=20_000)
    run_loop(main(parser.parse_args()), use_uvloop=True)
