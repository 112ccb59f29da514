"""The probe server, in process on a free port, with fake probes."""

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from amqp_agents.runtime.health import HealthServer, ProbeResult


class Readiness:
    """A readiness probe whose answer the test flips."""

    def __init__(self) -> None:
        self.ready = False

    def __call__(self) -> ProbeResult:
        if self.ready:
            return ProbeResult(200, b"ready\n")
        return ProbeResult(503, b"not ready\n")


def _broken() -> ProbeResult:
    raise RuntimeError("probe bug")


@pytest.fixture
def readiness() -> Readiness:
    """A readiness probe that starts not ready."""
    return Readiness()


@pytest.fixture
async def server(readiness: Readiness) -> AsyncIterator[HealthServer]:
    """A started server on 127.0.0.1 and a free port, closed after the test."""
    probes = HealthServer(
        {
            "/healthz": lambda: ProbeResult(200, b"ok\n"),
            "/readyz": readiness,
            "/broken": _broken,
        },
        host="127.0.0.1",
        port=0,
    )
    await probes.start()
    yield probes
    await probes.aclose()


async def _exchange(port: int, request: bytes) -> bytes:
    """Send a raw request and read the whole response (the server closes after one)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


async def _get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    raw = await _exchange(port, f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, body


async def test_port_zero_binds_a_free_port(server: HealthServer) -> None:
    """With port=0 the server reports the real port it listens on."""
    assert server.port > 0


async def test_healthz_ok(server: HealthServer) -> None:
    """GET /healthz answers 200 with the probe's body and correct headers."""
    status, headers, body = await _get(server.port, "/healthz")

    assert status == 200
    assert body == b"ok\n"
    assert headers["Content-Length"] == "3"
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert headers["Connection"] == "close"


async def test_query_string_is_ignored(server: HealthServer) -> None:
    """A query string does not change which probe answers."""
    status, _, _ = await _get(server.port, "/healthz?verbose=1")

    assert status == 200


async def test_probe_is_called_per_request(server: HealthServer, readiness: Readiness) -> None:
    """/readyz reflects the probe's current answer on every request."""
    assert (await _get(server.port, "/readyz"))[0] == 503
    readiness.ready = True
    assert (await _get(server.port, "/readyz"))[:3:2] == (200, b"ready\n")


async def test_unknown_path_is_404(server: HealthServer) -> None:
    """A path with no probe answers 404."""
    status, _, body = await _get(server.port, "/metrics")

    assert status == 404
    assert body == b"not found\n"


@pytest.mark.parametrize("method", ["POST", "HEAD", "DELETE"])
async def test_other_methods_are_405(server: HealthServer, method: str) -> None:
    """Anything but GET answers 405, even on a known path."""
    status, _, _ = await _get(server.port, "/healthz", method=method)

    assert status == 405


async def test_garbage_request_gets_no_answer(server: HealthServer) -> None:
    """A request line that is not HTTP closes the connection without a response."""
    assert await _exchange(server.port, b"nonsense\r\n\r\n") == b""


async def test_failing_probe_is_logged_and_server_survives(
    server: HealthServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A probe that raises closes that connection, is logged, and other requests still work."""
    with caplog.at_level(logging.ERROR, logger="amqp_agents.runtime.health"):
        assert await _exchange(server.port, b"GET /broken HTTP/1.1\r\n\r\n") == b""

    assert any(r.exc_info and r.exc_info[0] is RuntimeError for r in caplog.records)
    assert (await _get(server.port, "/healthz"))[0] == 200


async def test_aclose_is_idempotent_and_stops_listening(readiness: Readiness) -> None:
    """After aclose() (twice), connecting to the port is refused."""
    probes = HealthServer({"/readyz": readiness}, host="127.0.0.1", port=0)
    await probes.start()
    port = probes.port

    await probes.aclose()
    await probes.aclose()

    with pytest.raises(OSError, match=r"(?i)refused|connect"):
        await asyncio.open_connection("127.0.0.1", port)
