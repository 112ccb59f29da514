"""The example worker (``amqp-agents run``) heals what the broker takes away, on the
real broker: a deleted agent queue, a queue it may not re-declare for a while, a
connection closed by ``rabbitmqctl``. Probes, metrics and the broker's own counts are
checked after each fault; the recovery times are printed (``-s``) for the notes.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from amqp_agents.errors import QueueNotFoundError
from amqp_agents.models.messages import AgentResponse, ErrorCode
from amqp_agents.rpc.client import RpcClient
from amqp_agents.testing import BrokerAdmin, url_for_vhost
from amqp_agents.transport.rabbitmq import RabbitTransport
from tests.agents_for_tests import CliProcess, cli_env, free_port
from tests.integration.test_metrics_cli import http_get, page_where, sample, status
from tests.support import wait_until

Connect = Callable[..., Awaitable[RabbitTransport]]
WORKER_NAME = "self-healing-worker"
AGENT = "task_manager"
QUEUE = f"agents.{AGENT}"


class Load:
    """Calls ``task_list`` back to back, recording (sent at, reply) of each."""

    def __init__(self, client: RpcClient) -> None:
        self._client = client
        self.replies: list[tuple[float, AgentResponse]] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            reply = await self._client.send(AGENT, "task_list", {}, timeout_s=5)
            self.replies.append((sent, reply))

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 10)

    def codes(self, *, sent_after: float = 0.0) -> Counter[str]:
        return Counter(
            reply.error.code if reply.error else "ok"
            for sent, reply in self.replies
            if sent >= sent_after
        )


@pytest.fixture
async def worker(
    fresh_vhost: str, broker_url: str, tmp_path: Path
) -> AsyncIterator[tuple[CliProcess, int, str]]:
    """The example worker on a vhost of its own, with probes and fast depth probes."""
    port = free_port()
    url = url_for_vhost(broker_url, fresh_vhost)
    env = cli_env(
        AMQP_AGENTS_METRICS__DEPTH_INTERVAL_S="0.2",
        AMQP_AGENTS_CONNECTION__CLIENT_NAME=WORKER_NAME,
    )
    process = CliProcess(
        ["--url", url, "run", "amqp_agents.examples.tasks:app", "--metrics-port", str(port)],
        env=env,
        log_dir=tmp_path,
    )
    try:

        async def ready() -> bool:
            return process.running() and await status(port, "/readyz") == 200

        await wait_until(ready, timeout_s=20, what="the example worker ready")
        yield process, port, url
    finally:
        process.terminate()
        try:
            process.wait(20)
        finally:
            process.close()


async def consumers_back(observer: RabbitTransport, queue: str, *, since: float) -> float:
    """Seconds from ``since`` until the broker counts one consumer on ``queue`` (a
    passive declare every 20 ms: rabbitmqctl would add a second per look)."""

    async def one() -> bool:
        try:
            return (await observer.queue_info(queue)).consumers == 1
        except QueueNotFoundError:
            return False

    await wait_until(one, timeout_s=10, what=f"one consumer on {queue} (broker's count)")
    return time.monotonic() - since


async def test_a_deleted_agent_queue_comes_back_under_load(
    worker: tuple[CliProcess, int, str],
    broker_admin: BrokerAdmin,
    fresh_vhost: str,
    connect: Connect,
) -> None:
    process, port, url = worker
    async with RpcClient(await connect(url)) as client:
        load = Load(client)
        load.start()
        await wait_until(lambda: _answered(load, 20), timeout_s=10, what="twenty calls answered")
        observer = await connect(url)
        started = time.monotonic()
        dropped = await observer.delete_queue(QUEUE)  # what rabbitmqctl delete_queue does
        deleted = time.monotonic()
        back_s = await consumers_back(observer, QUEUE, since=started)
        settled = time.monotonic()
        await wait_until(
            lambda: _answered(load, 20, after=settled), timeout_s=10, what="calls after"
        )
        await load.stop()
    print(f"\nagent queue deleted: one consumer again after {back_s * 1000:.0f} ms")
    print(f"  worker log: {recovery_times(process)}")
    assert back_s < 2
    after = load.codes(sent_after=deleted)
    # Sent once the queue was gone: refused at once (NO_ROUTE) or answered; never lost.
    assert set(after) <= {"ok", ErrorCode.NO_ROUTE}, after
    # Lost: only what went with the queue. The load has one call at a time, so at most
    # one: waiting in the queue (counted in ``dropped``) or on its way into it.
    assert load.codes()[ErrorCode.TIMEOUT] <= 1
    assert dropped <= 1
    assert load.codes(sent_after=settled) == {"ok": load.codes(sent_after=settled)["ok"]}
    assert await status(port, "/readyz") == 200
    assert await status(port, "/healthz") == 200
    page = await page_where(
        process,
        port,
        lambda p: sample(p, "amqp_agents_queue_consumers", queue=QUEUE) == 1,
        what="the consumers gauge back at 1",
    )
    cancels = sample(page, "amqp_agents_consumer_cancels_total", queue=QUEUE, reason="cancelled")
    assert cancels == 1
    assert sample(page, "amqp_agents_consumer_attached", queue=QUEUE) == 1


async def test_a_queue_it_may_not_redeclare_is_not_ready_until_allowed(
    worker: tuple[CliProcess, int, str],
    broker_admin: BrokerAdmin,
    fresh_vhost: str,
    connect: Connect,
) -> None:
    """Deleted while the worker may not declare queues (403): /readyz 503 naming the
    queue and the reason, liveness still 200 within the bound, the consumers gauge 0
    (not a stale 1); allowed again, it comes back and /readyz is 200."""
    process, port, url = worker
    observer = await connect(url)
    await broker_admin.arun("set_permissions", "-p", fresh_vhost, "guest", "^$", ".*", ".*")
    try:
        await broker_admin.arun("delete_queue", "-p", fresh_vhost, QUEUE)

        async def not_ready() -> bool:
            got = await http_get(port, "/readyz")
            return got is not None and got[0] == 503 and QUEUE in got[1]

        await wait_until(not_ready, timeout_s=10, what="/readyz 503 naming the queue")
        got = await http_get(port, "/readyz")
        assert got is not None
        assert "cancelled" in got[1], got[1]
        assert await status(port, "/healthz") == 200
        page = await page_where(
            process,
            port,
            lambda p: sample(p, "amqp_agents_queue_consumers", queue=QUEUE) == 0,
            what="the consumers gauge at 0 for the missing queue",
        )
        assert sample(page, "amqp_agents_consumer_attached", queue=QUEUE) == 0
    finally:
        await broker_admin.arun("set_permissions", "-p", fresh_vhost, "guest", ".*", ".*", ".*")
    allowed = time.monotonic()
    back_s = await consumers_back(observer, QUEUE, since=allowed)
    print(f"\nre-declare allowed again: one consumer after {back_s * 1000:.0f} ms")

    async def ready() -> bool:
        return await status(port, "/readyz") == 200

    await wait_until(ready, timeout_s=10, what="/readyz 200 again")


async def test_a_closed_connection_heals_in_place(
    worker: tuple[CliProcess, int, str],
    broker_admin: BrokerAdmin,
    fresh_vhost: str,
    connect: Connect,
) -> None:
    """rabbitmqctl close_connection on the worker's connections: the same process
    reconnects and re-attaches every consumer; calls work again."""
    process, port, url = worker
    observer = await connect(url)
    listing = await broker_admin.arun(
        "list_connections", "--no-table-headers", "pid", "vhost", "client_properties"
    )
    pids = [
        line.split("\t")[0]
        for line in listing.splitlines()
        if f"\t{fresh_vhost}\t" in line and f'"{WORKER_NAME}/' in line
    ]
    assert len(pids) == 2, listing
    for pid in pids:
        await broker_admin.arun("close_connection", pid, "test: connection closed")
    closed = time.monotonic()  # after: rabbitmqctl itself takes about a second
    back_s = await consumers_back(observer, QUEUE, since=closed)
    print(f"\nconnection closed: one consumer again {back_s * 1000:.0f} ms after rabbitmqctl")
    times = recovery_times(process)
    print(f"  worker log: {times}")
    assert len(times) >= 3, "agent, event group and reply queues re-attached"
    async with RpcClient(await connect(url)) as client:
        reply = await client.send(AGENT, "task_list", {}, timeout_s=5)
    assert reply.ok, reply.error
    page = await page_where(
        process,
        port,
        lambda p: (sample(p, "amqp_agents_reconnects_total") or 0) >= 1,
        what="the reconnect counted",
    )
    cancels = sample(
        page, "amqp_agents_consumer_cancels_total", queue=QUEUE, reason="connection_lost"
    )
    assert cancels == 1
    assert process.running()


def recovery_times(process: CliProcess) -> list[str]:
    """The worker's own "re-attached after" log lines: queue, seconds, reason."""
    return re.findall(r"consumer of (\S+) re-attached after (\S+s \(\w+\))", process.output())


async def _answered(load: Load, count: int, *, after: float = 0.0) -> bool:
    return sum(load.codes(sent_after=after).values()) >= count
