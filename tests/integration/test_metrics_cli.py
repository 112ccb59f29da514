"""Metrics and probes through the command line: ``run --metrics-port``, ``queues``, ``exporter``.

Each command runs as a subprocess against the real broker; its pages are read over
HTTP and parsed with prometheus_client's own text parser.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from amqp_agents.config import WorkerSettings
from amqp_agents.models.topology import Topology
from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.agent import Agent, action
from amqp_agents.runtime.worker import Worker
from amqp_agents.testing import BrokerAdmin, url_for_vhost
from amqp_agents.transport.rabbitmq import RabbitTransport
from tests.agents_for_tests import CliProcess, cli_env, free_port, run_cli
from tests.support import wait_until

Connect = Callable[..., Awaitable[RabbitTransport]]
Unique = Callable[[str], str]

TOPOLOGY = Topology()
DEPTH = "amqp_agents_queue_depth"
CONSUMERS = "amqp_agents_queue_consumers"
DEPTH_ERRORS = "amqp_agents_queue_depth_errors_total"
LOSSES = "amqp_agents_connection_losses_total"
RECONNECTS = "amqp_agents_reconnects_total"
DEPTH_INTERVAL_S = "0.1"
"""``AMQP_AGENTS_METRICS__DEPTH_INTERVAL_S``: probe queue depth every 100 ms, not every 5 s."""


class Hold(Agent):
    """``hold`` stays in flight until ``release`` is set (at most 20 s)."""

    def __init__(self, *, name: str) -> None:
        super().__init__(name=name)
        self.release = asyncio.Event()
        self.entered = 0

    @action("hold")
    async def hold(self) -> None:
        self.entered += 1
        async with asyncio.timeout(20):
            await self.release.wait()


# -- helpers -------------------------------------------------------------------------


async def http_get(port: int, path: str, *, timeout_s: float = 2.0) -> tuple[int, str] | None:
    """One GET: its status and body; ``None`` if nothing listens or the server hung up."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
                await writer.drain()
                raw = await reader.read()
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
    except ConnectionError:
        return None
    if not raw:
        return None  # closed while shutting down
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), f"not an HTTP response: {raw!r}"
    return int(head.split()[1]), body.decode()


async def status(port: int, path: str) -> int | None:
    """The status of ``GET path``; ``None`` while nothing listens."""
    got = await http_get(port, path)
    return None if got is None else got[0]


def sample(page: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a Prometheus text page; ``None`` if absent."""
    for family in text_string_to_metric_families(page):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


async def page_where(
    process: CliProcess, port: int, check: Callable[[str], bool], *, what: str
) -> str:
    """Poll ``/metrics`` until ``check(page)`` (bounded); the page that passed."""
    page = ""

    async def passes() -> bool:
        nonlocal page
        process.running()
        got = await http_get(port, "/metrics")
        if got is None or got[0] != 200:
            return False
        page = got[1]
        return check(page)

    await wait_until(passes, timeout_s=20, what=what)
    return page


async def becomes_ready(process: CliProcess, port: int) -> None:
    """Wait (bounded) for ``/readyz`` 200; fail at once if the process exits."""

    async def ready() -> bool:
        return process.running() and await status(port, "/readyz") == 200

    await wait_until(ready, timeout_s=20, what="/readyz 200")


def collapse(statuses: list[int | None]) -> list[int | None]:
    """The statuses with repeats removed: the transitions."""
    return [s for i, s in enumerate(statuses) if i == 0 or s != statuses[i - 1]]


# -- run --metrics-port --------------------------------------------------------------


async def test_readyz_follows_the_broker_connection(
    broker_url: str,
    fresh_vhost: str,
    broker_admin: BrokerAdmin,
    unique: Unique,
    tmp_path: Path,
) -> None:
    """Connections closed by the broker: /readyz leaves 200, and is 200 again once back."""
    name, port = unique("linked"), free_port()
    queue = TOPOLOGY.agent_queue(name)
    env = cli_env(
        AAT_AGENT_NAME=name,
        AAT_RECORD_PATH=str(tmp_path / "ids"),
        AMQP_AGENTS_METRICS__DEPTH_INTERVAL_S=DEPTH_INTERVAL_S,
    )
    url = url_for_vhost(broker_url, fresh_vhost)
    args = ["--url", url, "run", "tests.agents_for_tests:recorder", "--metrics-port", str(port)]
    worker = CliProcess(args, env=env, log_dir=tmp_path)
    restarted: CliProcess | None = None
    statuses: list[int | None] = []
    try:
        await becomes_ready(worker, port)
        assert await status(port, "/healthz") == 200
        await page_where(
            worker,
            port,
            lambda page: (
                sample(page, DEPTH, queue=queue) == 0 and sample(page, CONSUMERS, queue=queue) == 1
            ),
            what="/metrics with the agent queue's depth and one consumer",
        )

        async def watch() -> None:
            # Every status /readyz gives, until the process is gone.
            while True:
                statuses.append(await status(port, "/readyz"))
                if statuses[-1] is None and worker.proc.poll() is not None:
                    return
                await asyncio.sleep(0.005)  # poll interval, not a synchronisation

        watcher = asyncio.create_task(watch())
        try:
            closed = await asyncio.to_thread(broker_admin.close_connections, fresh_vhost)
            assert closed >= 2, "the worker publishes and consumes on two connections"

            async def settled() -> bool:
                # Gone, or back to 200 after having left it.
                if worker.proc.poll() is not None:
                    return True
                return collapse(statuses)[-3:] == [200, 503, 200]

            try:
                await wait_until(settled, timeout_s=20, what="an exit or /readyz 200 again")
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {collapse(statuses)}\n{worker.output()}") from None
            if worker.proc.poll() is not None:
                await asyncio.wait_for(watcher, timeout=5)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

        if worker.proc.poll() is not None:
            # This version does not reconnect: the worker stops and the CLI exits 1
            # for its supervisor to restart it; /readyz never says 200 on the way out.
            assert collapse(statuses) in ([200, 503, None], [200, None]), statuses
            assert worker.wait(5) == 1, worker.output()
            last_line = worker.output().rstrip().splitlines()[-1]
            assert last_line.startswith("amqp-agents: BrokerUnavailableError:"), last_line
            assert "connection was lost" in last_line
            restarted = CliProcess(args, env=env, log_dir=tmp_path)
            await becomes_ready(restarted, port)
            current = restarted
        else:
            # A reconnecting worker: 503 while down, 200 again by itself.
            assert collapse(statuses) == [200, 503, 200], statuses
            current = worker
        assert await status(port, "/healthz") == 200
        page = await page_where(
            current,
            port,
            lambda page: sample(page, CONSUMERS, queue=queue) == 1,
            what="/metrics with the agent queue consumed again",
        )
        assert sample(page, DEPTH, queue=queue) == 0
        if current is worker:
            assert sample(page, LOSSES) == 1
            assert sample(page, RECONNECTS) == 1
        current.terminate()
        assert await current.await_exit(15) == 0, current.output()
    finally:
        worker.close()
        if restarted is not None:
            restarted.close()


# -- queues and exporter -------------------------------------------------------------


async def test_queues_prints_ready_and_consumers(
    connect: Connect, amqp_url: str, unique: Unique
) -> None:
    """`queues --agent A --group G`: ready and consumers per queue, "missing" for absent ones."""
    name, group = unique("listed"), unique("nogroup")
    queue = TOPOLOGY.agent_queue(name)
    observer = await connect()
    agent = Hold(name=name)
    worker = Worker(await connect(), [agent], settings=WorkerSettings(concurrency=1))
    await worker.start()
    try:
        async with RpcClient(observer) as client:
            for _ in range(3):
                await client.notify(name, "hold", timeout_s=60)
        await wait_until(lambda: agent.entered == 1, timeout_s=10, what="one in flight")

        async def two_ready() -> bool:
            return (await observer.queue_info(queue)).messages == 2

        await wait_until(two_ready, timeout_s=10, what="two requests waiting")
        args = ["--url", amqp_url, "queues", "--agent", name, "--group", group]
        done = await asyncio.to_thread(run_cli, *args, env=cli_env(pythonpath=False))
    finally:
        agent.release.set()
        await worker.stop()
    assert done.returncode == 0, done.stderr
    header, *lines = done.stdout.splitlines()
    assert header.split() == ["queue", "ready", "consumers"]
    assert [line.split() for line in lines] == [
        [queue, "2", "1"],
        [TOPOLOGY.agent_dead_letter_queue(name), "0", "0"],
        [TOPOLOGY.group_queue(group), "-", "missing"],
        [TOPOLOGY.group_dead_letter_queue(group), "-", "missing"],
    ]


async def test_exporter_serves_the_real_depth_and_exits_0_on_sigterm(
    connect: Connect, amqp_url: str, unique: Unique, tmp_path: Path
) -> None:
    """`exporter --port P --agent A`: /metrics follows the broker's depth; SIGTERM exits 0."""
    name, group, port = unique("exported"), unique("nogroup"), free_port()
    queue, absent = TOPOLOGY.agent_queue(name), TOPOLOGY.group_queue(group)
    dead = TOPOLOGY.agent_dead_letter_queue(name)
    observer = await connect()
    declare = Worker(await connect(), [Hold(name=name)])
    await declare.start()
    await declare.stop()  # the queue stays, with no consumer: requests pile up
    args = ["--url", amqp_url, "exporter", "--port", str(port), "--agent", name, "--group", group]
    env = cli_env(pythonpath=False, AMQP_AGENTS_METRICS__DEPTH_INTERVAL_S=DEPTH_INTERVAL_S)
    exporter = CliProcess(args, env=env, log_dir=tmp_path)
    try:
        async with RpcClient(observer) as client:
            for _ in range(3):
                await client.notify(name, "hold", timeout_s=60)
            page = await page_where(
                exporter,
                port,
                # One probe sets the queues one after the other: wait for the last one too.
                lambda page: (
                    sample(page, DEPTH, queue=queue) == 3
                    and sample(page, DEPTH, queue=dead) is not None
                ),
                what="depth 3 on /metrics",
            )
            assert (await observer.queue_info(queue)).messages == 3
            assert sample(page, CONSUMERS, queue=queue) == 0
            assert sample(page, DEPTH, queue=dead) == 0
            # Created at 0 at start (Metrics.initialise), not on the first failure.
            assert sample(page, DEPTH_ERRORS, queue=dead) == 0
            for _ in range(2):
                await client.notify(name, "hold", timeout_s=60)
        page = await page_where(
            exporter,
            port,
            lambda page: sample(page, DEPTH, queue=queue) == 5,
            what="depth 5 on /metrics",
        )
        assert (await observer.queue_info(queue)).messages == 5
        # The absent group's queue counts failed probes and reads as empty and
        # unconsumed (not a stale value, nor no series: QueueWithoutConsumers can fire).
        assert (sample(page, DEPTH_ERRORS, queue=absent) or 0) >= 1
        assert sample(page, DEPTH, queue=absent) == 0
        assert sample(page, CONSUMERS, queue=absent) == 0
        assert await status(port, "/healthz") == 200
        exporter.terminate()
        started = time.monotonic()
        code = await exporter.await_exit(10)
    finally:
        exporter.close()
    assert code == 0, exporter.output()
    assert time.monotonic() - started < 5
    assert await status(port, "/metrics") is None
    assert (await observer.queue_info(queue)).messages == 5, "the exporter never consumes"
