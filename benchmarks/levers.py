"""Two of issue 20's broker-side levers, measured on the raw baseline rather than assumed:

* ``replies``: the raw client with an exclusive reply queue against the same client with
  RabbitMQ's direct reply-to (``amq.rabbitmq.reply-to``: no reply queue at all);
* ``acks``: the raw echo server acking each request against the same server acking once
  per loop turn with ``multiple=True`` (up to the highest tag whose requests are all
  answered, so the at-least-once order holds).

Each is :class:`~benchmarks.rawclient.RawRpcClient` at concurrency 100 with transient
requests against a fresh raw echo server process per repetition; the two variants
alternate, each first in every other repetition. Calls/s and client, server and broker
CPU per call are printed per repetition and as medians, with the median of the
per-repetition ratios. The README's Performance section quotes them; ours has neither
lever, these runs say whether it should.

    python -m benchmarks.levers replies --reps 3 --calls 20000
    python -m benchmarks.levers acks --reps 3 --calls 20000
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

from amqp_agents.testing import BrokerAdmin, url_for_vhost
from benchmarks.common import drive, echo_payload, find_broker_pid, run_loop
from benchmarks.proc import ServerProcess
from benchmarks.rawclient import RawRpcClient

CONCURRENCY = 100
KEYS = ("calls_per_s", "client_cpu_us", "server_cpu_us", "broker_cpu_us")


@dataclass(frozen=True)
class Variant:
    """One side of an experiment: which raw server, and the client's reply path."""

    label: str
    server: str
    direct_reply_to: bool = False


EXPERIMENTS: dict[str, tuple[Variant, Variant]] = {
    "replies": (
        Variant("exclusive reply queue", "raw-echo"),
        Variant("direct reply-to", "raw-echo", direct_reply_to=True),
    ),
    "acks": (
        Variant("one ack per request", "raw-echo"),
        Variant("acks coalesced per loop turn", "raw-echo-coalesced-acks"),
    ),
}


async def one(
    url: str, name: str, calls: int, broker_pid: int | None, variant: Variant
) -> dict[str, float]:
    """One repetition of one variant: a fresh raw echo server, warm-up, ``calls`` calls."""
    args = [variant.server, "--url", url, "--name", name, "--prefetch", "100", "--uvloop"]
    async with ServerProcess(f"{variant.server} {name}", "benchmarks.servers", args) as server:
        client = RawRpcClient(url, persistent=False, direct=variant.direct_reply_to)
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
    base, other = EXPERIMENTS[args.experiment]
    admin = BrokerAdmin()
    vhost = admin.create_vhost("amqp-agents-bench")
    try:
        url = url_for_vhost(args.url, vhost)
        runs: dict[Variant, list[dict[str, float]]] = {base: [], other: []}
        for rep in range(args.reps):
            order = [base, other] if rep % 2 == 0 else [other, base]  # neither always second
            for index, variant in enumerate(order):
                metrics = await one(url, f"lever-{index}-{rep}", args.calls, broker_pid, variant)
                runs[variant].append(metrics)
                shown = ", ".join(f"{key} {metrics.get(key, float('nan')):,.1f}" for key in KEYS)
                print(f"rep {rep + 1} {variant.label}: {shown}", flush=True)
        for variant, results in runs.items():
            medians = {
                key: statistics.median(run[key] for run in results)
                for key in KEYS
                if all(key in run for run in results)
            }
            print(
                f"median {variant.label}: " + ", ".join(f"{k} {v:,.1f}" for k, v in medians.items())
            )
        ratios = [
            o["calls_per_s"] / b["calls_per_s"]
            for b, o in zip(runs[base], runs[other], strict=True)
        ]
        print(
            f"{other.label} / {base.label}, calls/s, median of per-rep ratios:"
            f" {statistics.median(ratios):.2f}x"
        )
    finally:
        admin.delete_vhost(vhost)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.levers")
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--calls", type=int, default=20_000)
    run_loop(main(parser.parse_args()), use_uvloop=True)
