"""`amqp-agents run` says what it serves, logs each stop signal with the work in flight,
and stops at once on a second one while the broker requeues that work (issue 18)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from amqp_agents.models.topology import Topology
from amqp_agents.rpc.client import RpcClient
from amqp_agents.transport.base import Delivery
from amqp_agents.transport.rabbitmq import RabbitTransport
from tests.agents_for_tests import CliProcess, cli_env, free_port, read_ids
from tests.support import wait_until

Connect = Callable[..., Awaitable[RabbitTransport]]


async def test_second_sigint_stops_at_once_and_the_request_is_requeued(
    connect: Connect, unique: Callable[[str], str], amqp_url: str, tmp_path: Path
) -> None:
    """First SIGINT: logged with 1 in flight, graceful stop begins (25 s grace). Second:
    exit 130 at once; the held request goes back to the queue, redelivered."""
    name, record = unique("signals"), tmp_path / "ids"
    port = free_port()
    env = cli_env(AAT_AGENT_NAME=name, AAT_RECORD_PATH=str(record))
    args = ["--url", amqp_url, "run", "tests.agents_for_tests:recorder"]
    args += ["--metrics-port", str(port), "--metrics-host", "127.0.0.1"]
    worker = CliProcess(args, env=env, log_dir=tmp_path)
    transport = await connect()
    try:
        await wait_until(
            lambda: f"consuming agents.{name}" in worker.output(),
            timeout_s=20,
            what="the worker to consume",
        )
        started = worker.output()
        assert "event loop, concurrency 16" in started
        assert f"agent {name}: actions hold, work; events none" in started
        assert f"serving /metrics, /healthz and /readyz on http://127.0.0.1:{port}" in started
        async with RpcClient(transport) as client:
            await client.notify(name, "hold", {"id": 7}, timeout_s=600)  # never released
        await wait_until(lambda: read_ids(record) == [7], timeout_s=20, what="the hold to run")
        worker.proc.send_signal(signal.SIGINT)
        await wait_until(
            lambda: "SIGINT: stopping gracefully, 1 request(s) in flight" in worker.output(),
            timeout_s=10,
            what="the first SIGINT to be logged",
        )
        worker.proc.send_signal(signal.SIGINT)
        signalled = time.monotonic()
        code = await worker.await_exit(15)
        exit_s = time.monotonic() - signalled
    finally:
        worker.close()
    output = worker.output()
    assert code == 130, output
    assert exit_s < 5, f"exit took {exit_s:.1f}s"
    assert "SIGINT again: stopping at once; the broker requeues the 1 request(s)" in output
    assert "Traceback" not in output
    got: list[Delivery] = []
    arrived = asyncio.Event()

    async def on_delivery(delivery: Delivery) -> None:
        got.append(delivery)
        arrived.set()

    consumer = await transport.consume(Topology().agent_queue(name), on_delivery, prefetch=1)
    try:
        await asyncio.wait_for(arrived.wait(), 10)
    finally:
        await consumer.cancel()
    (delivery,) = got
    assert delivery.envelope.type == "hold"
    assert delivery.envelope.redelivered
    await delivery.ack()
