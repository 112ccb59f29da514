"""RPC calls/s at concurrency 100 against ``amqp-agents run --processes N`` (issue 20).

The harness's servers speak their own stdin/stdout protocol; this case needs the real
command, so it starts ``amqp-agents run benchmarks.agents:EchoAgent --processes N
--concurrency 100`` on a throw-away vhost (``rabbitmqctl``), waits for its ``/readyz``,
drives calls with the harness's :func:`~benchmarks.common.drive`, and stops it with
SIGTERM. Runs alternate between the process counts so load on a shared machine hits
each alike. The workers' CPU is read from ``/proc`` of every worker process, and the
broker's from its ``beam.smp`` when the broker runs on this machine. Requests are
persistent (the library's default) unless ``--transient`` (as in ``rpc.c100``).

    python -m benchmarks.processes --processes 1 2 --reps 3 --calls 20000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
from pathlib import Path

from pydantic import SecretStr

from amqp_agents import ConnectionSettings, RabbitTransport, RpcClient, RpcSettings
from amqp_agents.cli.scrape import get
from amqp_agents.testing import BrokerAdmin, url_for_vhost
from benchmarks.agents import EchoAgent, EchoPayload
from benchmarks.common import (
    BenchError,
    drive,
    echo_payload,
    find_broker_pid,
    process_cpu_s,
    run_loop,
)
from benchmarks.proc import REPO_ROOT

CONCURRENCY = 100
PORT = 9431


def workers_of(pid: int) -> list[int]:
    """The worker processes: the children of a parent, else the process itself."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] or [pid]


async def measure(
    url: str, processes: int, calls: int, broker_pid: int | None, *, persistent: bool
) -> dict[str, float]:
    """One run: start the command, warm up, drive ``calls`` calls, stop it."""
    command = [sys.executable, "-m", "amqp_agents", "--url", url, "--log-level", "WARNING"]
    command += ["run", "benchmarks.agents:EchoAgent", "--processes", str(processes)]
    command += ["--concurrency", str(CONCURRENCY), "--metrics-port", str(PORT)]
    command += ["--metrics-host", "127.0.0.1"]
    server = await asyncio.create_subprocess_exec(*command, cwd=REPO_ROOT)
    try:
        async with asyncio.timeout(60):
            while (answer := await get(PORT, "/readyz", timeout_s=2)) is None or (
                answer.status != 200
            ):
                if server.returncode is not None:
                    raise BenchError(f"the worker exited with {server.returncode}")
                await asyncio.sleep(0.2)
        transport = RabbitTransport(ConnectionSettings(url=SecretStr(url)))
        settings = RpcSettings(persistent=persistent)
        async with transport, RpcClient(transport, settings=settings) as client:
            payload = EchoPayload.model_validate(echo_payload())

            async def call() -> None:
                await client.call(EchoAgent.name, "echo", payload)  # raises on an error

            await drive(call, calls=calls // 10, concurrency=CONCURRENCY)
            workers = workers_of(server.pid)
            cpu_before = sum(process_cpu_s(pid) for pid in workers)
            result = await drive(call, calls=calls, concurrency=CONCURRENCY, broker_pid=broker_pid)
            workers_cpu_s = sum(process_cpu_s(pid) for pid in workers) - cpu_before
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(server.wait(), 60)
        except TimeoutError:
            server.kill()
            await asyncio.wait_for(server.wait(), 10)
    return {**result.metrics(), "workers_cpu_us": workers_cpu_s / calls * 1e6}


async def main(args: argparse.Namespace) -> None:
    admin = BrokerAdmin()
    vhost = await asyncio.to_thread(admin.create_vhost, "bench-processes")
    url = url_for_vhost(args.url, vhost)
    runs: dict[int, list[dict[str, float]]] = {count: [] for count in args.processes}
    broker_pid, unmeasured = await asyncio.to_thread(find_broker_pid, args.url)
    if broker_pid is None:
        print(f"broker CPU is not measured: {unmeasured}")
    try:
        for rep in range(args.reps):
            for count in args.processes:
                found = await measure(
                    url, count, args.calls, broker_pid, persistent=not args.transient
                )
                runs[count].append(found)
                print(f"rep {rep + 1}, --processes {count}: {found['calls_per_s']:,.0f} calls/s")
    finally:
        await asyncio.to_thread(admin.delete_vhost, vhost)
    load = os.getloadavg()
    print(f"\n{os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(
        "processes  calls/s (median)  p50 ms  client CPU us/call  workers CPU us/call"
        "  broker CPU us/call"
    )
    for count, measured in runs.items():

        def median(key: str, measured: list[dict[str, float]] = measured) -> float:
            return statistics.median(run[key] for run in measured)

        print(
            f"{count:>9}  {median('calls_per_s'):>16,.0f}  {median('p50_ms'):>6.2f}"
            f"  {median('client_cpu_us'):>18.0f}  {median('workers_cpu_us'):>19.0f}"
            f"  {median('broker_cpu_us') if broker_pid else float('nan'):>18.0f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--transient", action="store_true", help="requests transient")
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    run_loop(main(parser.parse_args()), use_uvloop=True)
