"""Probes: ``HealthServer`` in-process, and ``amqp-agents run --metrics-port`` end to end."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from amqp_agents.examples.tasks import TaskManager
from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.health import HealthServer, ProbeResult
from amqp_agents.runtime.worker import Worker
from amqp_agents.transport.rabbitmq import RabbitTransport
from tests.agents_for_tests import CliProcess, cli_env, free_port, read_ids, run_cli
from tests.support import wait_until

Connect = Callable[..., Awaitable[RabbitTransport]]


async def http(port: int, path: str, *, method: str = "GET", timeout_s: float = 2.0) -> int:
    """Send one request and return the response's status code (bounded)."""
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    assert raw.startswith(b"HTTP/1.1 "), f"not an HTTP response: {raw!r}"
    return int(raw.split()[1])


async def http_or_none(port: int, path: str) -> int | None:
    """The status, or ``None`` while nothing listens on the port."""
    try:
        return await http(port, path)
    except OSError:
        return None


def readiness(is_ready: Callable[[], bool]) -> dict[str, Callable[[], ProbeResult]]:
    """The routes the CLI serves, over any readiness predicate."""
    return {
        "/healthz": lambda: ProbeResult(200, b"ok\n"),
        "/readyz": lambda: (
            ProbeResult(200, b"ready\n") if is_ready() else ProbeResult(503, b"not ready\n")
        ),
    }


async def test_routes_status_codes_with_a_fake_probe() -> None:
    """/readyz follows its probe; /healthz 200; unknown path 404; non-GET 405."""
    ready = False
    server = HealthServer(readiness(lambda: ready), host="127.0.0.1", port=0)
    await server.start()
    try:
        assert await http(server.port, "/readyz") == 503
        ready = True
        assert await http(server.port, "/readyz") == 200
        assert await http(server.port, "/readyz?verbose=1") == 200
        assert await http(server.port, "/healthz") == 200
        assert await http(server.port, "/metricz") == 404
        assert await http(server.port, "/healthz", method="POST") == 405
        assert await http(server.port, "/nope", method="DELETE") == 405
    finally:
        await server.aclose()


async def test_readyz_follows_the_worker_lifecycle(
    connect: Connect, unique: Callable[[str], str]
) -> None:
    """/readyz is 503 before Worker.start(), 200 while consuming, 503 after stop()."""
    worker = Worker(await connect(), [TaskManager(name=unique("ready"))])
    server = HealthServer(readiness(lambda: worker.is_ready), host="127.0.0.1", port=0)
    await server.start()
    try:
        assert await http(server.port, "/readyz") == 503
        await worker.start()
        try:
            assert await http(server.port, "/readyz") == 200
        finally:
            await worker.stop()
        assert await http(server.port, "/readyz") == 503
        assert await http(server.port, "/healthz") == 200
    finally:
        await server.aclose()


async def test_silent_client_is_cut_off_without_blocking_others() -> None:
    """A client that sends nothing is closed after the 5 s read timeout; others are served."""
    server = HealthServer(readiness(lambda: True), host="127.0.0.1", port=0)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        opened = time.monotonic()
        try:
            for _ in range(5):
                assert await http(server.port, "/healthz", timeout_s=1) == 200
            assert await asyncio.wait_for(reader.read(), 10) == b""
            cut_after = time.monotonic() - opened
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        assert 4 <= cut_after < 8, f"cut off after {cut_after:.1f}s"
    finally:
        await server.aclose()


async def test_cli_worker_serves_probes_and_drains_unready(
    connect: Connect, amqp_url: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    """`run --metrics-port`: 200s once consuming; on SIGTERM /readyz is 503 while draining."""
    name, port, record = unique("probed"), free_port(), tmp_path / "ids"
    env = cli_env(AAT_AGENT_NAME=name, AAT_RECORD_PATH=str(record))
    args = ["--url", amqp_url, "run", "tests.agents_for_tests:recorder"]
    worker = CliProcess(
        [*args, "--metrics-port", str(port), "--grace-period", "20"], env=env, log_dir=tmp_path
    )
    observer = await connect()

    async def status_is(path: str, code: int) -> bool:
        return worker.running() and await http_or_none(port, path) == code

    try:
        await wait_until(lambda: status_is("/readyz", 200), timeout_s=20, what="/readyz 200")
        assert (await observer.queue_info(f"agents.{name}")).consumers == 1
        assert await http(port, "/healthz") == 200
        assert await http(port, "/nope") == 404
        assert await http(port, "/readyz", method="POST") == 405

        async with RpcClient(observer) as client:
            await client.notify(name, "hold", {"id": 1}, timeout_s=60)

        async def holding() -> bool:
            return worker.running() and read_ids(record) == [1]

        await wait_until(holding, timeout_s=10, what="the hold request to be in flight")
        worker.terminate()
        await wait_until(lambda: status_is("/readyz", 503), timeout_s=10, what="/readyz 503")
        assert await http(port, "/healthz") == 200
        worker.proc.send_signal(signal.SIGUSR1)  # let the in-flight request finish
        code = await worker.await_exit(15)
    finally:
        worker.close()
    assert code == 0, worker.output()
    assert await http_or_none(port, "/healthz") is None
    assert (await observer.queue_info(f"agents.{name}")).messages == 0, "hold was requeued"


def test_metrics_port_in_use_fails_clearly(
    amqp_url: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    """A --metrics-port that is taken exits non-zero with a clear message, not a traceback."""
    env = cli_env(AAT_AGENT_NAME=unique("clash"), AAT_RECORD_PATH=str(tmp_path / "ids"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        args = ["--url", amqp_url, "run", "tests.agents_for_tests:recorder"]
        done = run_cli(*args, "--metrics-port", port, env=env)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert port in done.stderr
    assert "in use" in done.stderr
