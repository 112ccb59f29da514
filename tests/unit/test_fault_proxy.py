"""The fault-injection proxy itself, against a local echo server (no broker).

The echo server counts what reaches it, so a test can tell "the proxy held the bytes"
from "the bytes got lost on the way back".
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.agents_for_tests import free_port
from tests.faults import FaultProxy, TlsMaterial, make_tls_material
from tests.support import wait_until, wait_until_sync

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Dial = Callable[..., Coroutine[Any, Any, Streams]]

NOTHING_ARRIVES_S = 0.3


class EchoServer:
    """Echoes every byte back; counts connections and bytes received."""

    def __init__(self) -> None:
        self.connections = 0
        self.open_connections = 0
        self.bytes_received = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._echo, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_connections += 1
        self._writers.add(writer)
        try:
            while data := await reader.read(65536):
                self.bytes_received += len(data)
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            self.open_connections -= 1
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            self._writers.discard(writer)

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await wait_until(lambda: not self._writers, timeout_s=5, what="echo connections to close")
        await self._server.wait_closed()


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    """The upstream the proxies forward to, on the test's loop."""
    server = EchoServer()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    """A plain proxy in front of :func:`echo`."""
    with FaultProxy("127.0.0.1", echo.port) as running:
        yield running


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    """One throw-away PKI for the module (key generation is the slow part)."""
    return make_tls_material(tmp_path_factory.mktemp("tls"))


@pytest.fixture
async def dial() -> AsyncIterator[Dial]:
    """``await dial(port, host, **open_connection_kwargs)``; every client is closed after.

    (Not named ``connect``: conftest's ``connect`` opens broker transports.)
    """
    writers: list[asyncio.StreamWriter] = []

    async def open_client(port: int, host: str = "127.0.0.1", **kwargs: object) -> Streams:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, **kwargs),  # type: ignore[arg-type]
            timeout=5,
        )
        writers.append(writer)
        return reader, writer

    yield open_client
    for writer in writers:
        writer.close()
    for writer in writers:
        with contextlib.suppress(OSError):
            await asyncio.wait_for(writer.wait_closed(), timeout=5)


async def roundtrip(streams: Streams, payload: bytes) -> bytes:
    """Send ``payload`` and read back as many bytes (bounded)."""
    reader, writer = streams
    writer.write(payload)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(payload)), timeout=5)


async def nothing_arrives(reader: asyncio.StreamReader) -> bool:
    """True if no byte (and no EOF) arrives within :data:`NOTHING_ARRIVES_S`."""
    try:
        await asyncio.wait_for(reader.read(1), NOTHING_ARRIVES_S)
    except TimeoutError:
        return True
    return False


async def assert_dropped(reader: asyncio.StreamReader, *, within_s: float = 2.0) -> None:
    """The connection ends (EOF or reset) within ``within_s``; leftover bytes may come first."""
    deadline = time.monotonic() + within_s
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"connection still open after {within_s}s"
        try:
            data = await asyncio.wait_for(reader.read(65536), remaining)
        except (ConnectionError, ssl.SSLError):
            return
        except TimeoutError:
            raise AssertionError(f"connection still open after {within_s}s") from None
        if not data:
            return


async def test_bytes_flow_both_ways_and_connections_are_counted(
    proxy: FaultProxy, echo: EchoServer, dial: Dial
) -> None:
    """Small and large payloads come back intact; the counters follow the connection."""
    streams = await dial(proxy.port)
    assert await roundtrip(streams, b"hello") == b"hello"
    big = bytes(range(256)) * 8192  # 2 MiB: several chunks, and backpressure
    assert await roundtrip(streams, big) == big
    assert (proxy.accepted_total, proxy.active_connections) == (1, 1)
    assert echo.bytes_received == 5 + len(big)

    streams[1].close()
    await wait_until(
        lambda: proxy.active_connections == 0 and echo.open_connections == 0,
        timeout_s=2,
        what="the proxy to close both sides after the client left",
    )
    assert proxy.accepted_total == 1


async def test_half_close_is_forwarded(proxy: FaultProxy, dial: Dial) -> None:
    """A client's EOF reaches the server, and the server's answer still comes back."""
    reader, writer = await dial(proxy.port)
    writer.write(b"last words")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), timeout=5) == b"last words"


async def test_cut_resets_both_sides_and_new_connections_work(
    proxy: FaultProxy, echo: EchoServer, dial: Dial
) -> None:
    """After cut() the client sees the end at once, the server too; reconnecting works."""
    first = await dial(proxy.port)
    second = await dial(proxy.port)
    assert await roundtrip(first, b"a") == b"a"
    assert await roundtrip(second, b"b") == b"b"

    started = time.monotonic()
    assert proxy.cut() == 2
    assert proxy.active_connections == 0  # applied before cut() returned
    await assert_dropped(first[0], within_s=1)
    await assert_dropped(second[0], within_s=1)
    assert time.monotonic() - started < 1.5
    await wait_until(lambda: echo.open_connections == 0, timeout_s=2, what="upstream side closed")

    again = await dial(proxy.port)
    assert await roundtrip(again, b"back") == b"back"
    assert proxy.accepted_total == 3
    assert proxy.cut() == 1


async def test_stall_forwards_nothing_and_resume_resets_old_connections(
    proxy: FaultProxy, echo: EchoServer, dial: Dial
) -> None:
    """Stalled: no byte moves; resume(): old connections die, ones made meanwhile forward."""
    old = await dial(proxy.port)
    assert await roundtrip(old, b"before") == b"before"
    received = echo.bytes_received

    proxy.stall()
    assert proxy.is_stalled()
    old[1].write(b"lost")
    assert await nothing_arrives(old[0])
    new = await dial(proxy.port)  # accepted, but not connected upstream
    new[1].write(b"held")
    assert await nothing_arrives(new[0])
    assert echo.bytes_received == received
    assert (proxy.active_connections, echo.connections) == (2, 1)

    assert proxy.resume() == 1
    assert not proxy.is_stalled()
    await assert_dropped(old[0], within_s=1)
    assert await asyncio.wait_for(new[0].readexactly(4), timeout=5) == b"held"
    assert await roundtrip(new, b"after") == b"after"
    assert echo.connections == 2
    assert proxy.active_connections == 1


async def test_resume_keeping_connections_delivers_what_was_held(
    proxy: FaultProxy, echo: EchoServer, dial: Dial
) -> None:
    """resume(reset_stalled=False): the same connection carries on, nothing is lost."""
    streams = await dial(proxy.port)
    assert await roundtrip(streams, b"x") == b"x"
    proxy.stall()
    proxy.stall()  # idempotent
    streams[1].write(b"during")
    assert await nothing_arrives(streams[0])
    assert echo.bytes_received == 1

    assert proxy.resume(reset_stalled=False) == 0
    assert await asyncio.wait_for(streams[0].readexactly(6), timeout=5) == b"during"
    assert proxy.resume() == 0  # not stalled: nothing to do
    assert await roundtrip(streams, b"more") == b"more"
    assert (proxy.accepted_total, echo.connections) == (1, 1)


async def test_refuse_resets_new_connections_until_accept(
    proxy: FaultProxy, echo: EchoServer, dial: Dial
) -> None:
    """While refusing, new clients are dropped at once; existing ones keep working."""
    existing = await dial(proxy.port)
    assert await roundtrip(existing, b"in") == b"in"  # accepted by the proxy, not just the kernel
    proxy.refuse()
    try:
        refused = await dial(proxy.port)
    except ConnectionError:
        pass  # reset before the connect completed: also a refusal
    else:
        await assert_dropped(refused[0], within_s=1)
    assert await roundtrip(existing, b"still") == b"still"
    assert (proxy.refused_total, proxy.accepted_total, echo.connections) == (1, 1, 1)

    proxy.accept()
    fresh = await dial(proxy.port)
    assert await roundtrip(fresh, b"ok") == b"ok"
    assert (proxy.refused_total, proxy.accepted_total) == (1, 2)


def test_unreachable_upstream_drops_the_client_from_a_sync_test() -> None:
    """No broker behind the proxy: the client is dropped, the proxy serves on (plain sockets)."""
    with FaultProxy("127.0.0.1", free_port()) as proxy:
        for _ in range(2):
            try:  # the reset may even beat the end of the client's connect
                with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as sock:
                    assert sock.recv(1) == b""
            except ConnectionResetError:
                pass
        wait_until_sync(
            lambda: proxy.accepted_total == 2 and proxy.active_connections == 0,
            timeout_s=2,
            what="both clients accepted and dropped",
        )


async def test_stop_closes_everything_quickly_and_never_hangs(
    echo: EchoServer, dial: Dial, tls: TlsMaterial
) -> None:
    """stop() with live, stalled and mid-handshake connections returns fast and frees the port."""
    secure_context = tls.server_context()
    with (
        FaultProxy("127.0.0.1", echo.port) as plain,
        FaultProxy("127.0.0.1", echo.port, server_ssl=secure_context) as secure,
    ):
        live = await dial(plain.port)
        assert await roundtrip(live, b"1") == b"1"
        plain.stall()
        stalled = await dial(plain.port)
        silent = await dial(secure.port)  # TCP only: the TLS handshake never starts
        await wait_until(
            lambda: (plain.active_connections, secure.active_connections) == (2, 1),
            timeout_s=2,
            what="the proxies to accept",
        )

        started = time.monotonic()
        plain.stop()
        secure.stop()
        assert time.monotonic() - started < 3
        for reader, _ in (live, stalled, silent):
            await assert_dropped(reader, within_s=1)
        with pytest.raises(ConnectionRefusedError):
            await dial(plain.port)
        plain.stop()  # idempotent
        with pytest.raises(RuntimeError, match="not running"):
            plain.cut()


async def _storm(port: int, writers: list[asyncio.StreamWriter], done: asyncio.Event) -> None:
    """Connect to ``port`` again and again until ``done``."""
    while not done.is_set():
        with contextlib.suppress(OSError):
            writers.append((await asyncio.open_connection("127.0.0.1", port))[1])
        await asyncio.sleep(0)


async def _stop_during_a_storm(proxy: FaultProxy) -> None:
    """Three clients connect again and again while ``proxy`` stops; close them after."""
    done = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []
    tasks = [asyncio.create_task(_storm(proxy.port, writers, done)) for _ in range(3)]
    await wait_until(lambda: proxy.accepted_total >= 5, timeout_s=5, what="clients to connect")
    await asyncio.to_thread(proxy.stop)
    done.set()
    await asyncio.gather(*tasks)
    for writer in writers:
        writer.close()
    for writer in writers:
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_stop_during_a_connect_storm_leaks_no_socket(echo: EchoServer) -> None:
    """Clients keep connecting while stop() runs: every accepted socket is closed.

    A leaked one shows up as a ResourceWarning at gc time (an error in this suite).
    """
    for round_ in range(5):
        proxy = FaultProxy("127.0.0.1", echo.port).start()
        if round_ % 2:
            proxy.stall()
        await _stop_during_a_storm(proxy)
        gc.collect()


async def test_tls_is_terminated_and_trusts_only_the_test_ca(
    echo: EchoServer, dial: Dial, tls: TlsMaterial
) -> None:
    """The test CA verifies (by name and by IP); the wrong CA fails; the proxy serves on."""
    with FaultProxy("127.0.0.1", echo.port, server_ssl=tls.server_context()) as proxy:
        for host in ("localhost", "127.0.0.1"):
            streams = await dial(proxy.port, host, ssl=tls.client_context())
            assert await roundtrip(streams, b"secret") == b"secret"
        assert echo.bytes_received == 12  # plaintext upstream

        with pytest.raises(ssl.SSLCertVerificationError):
            await dial(proxy.port, "localhost", ssl=tls.client_context(ca_file=tls.wrong_ca_file))
        await wait_until(
            lambda: proxy.handshake_failures == 1, timeout_s=2, what="handshake failure"
        )
        assert echo.connections == 2  # never forwarded

        streams = await dial(proxy.port, "localhost", ssl=tls.client_context())
        assert await roundtrip(streams, b"again") == b"again"


@pytest.mark.parametrize("presented", ["none", "wrong"])
async def test_client_certificates_are_required_when_asked(
    echo: EchoServer, dial: Dial, tls: TlsMaterial, presented: str
) -> None:
    """require_client_cert: the CA's client cert passes; none, or the wrong CA's, fails."""
    server = tls.server_context(require_client_cert=True)
    with FaultProxy("127.0.0.1", echo.port, server_ssl=server) as proxy:
        good = tls.client_context(certfile=tls.client_cert, keyfile=tls.client_key)
        assert await roundtrip(await dial(proxy.port, ssl=good), b"mtls") == b"mtls"

        bad = tls.client_context()
        if presented == "wrong":
            bad = tls.client_context(certfile=tls.wrong_client_cert, keyfile=tls.wrong_client_key)
        try:
            reader, writer = await dial(proxy.port, ssl=bad)
        except (ssl.SSLError, ConnectionError):
            pass  # TLS 1.2: the handshake itself fails
        else:  # TLS 1.3: the client learns on its first read
            writer.write(b"let me in")
            await assert_dropped(reader, within_s=2)
        await wait_until(
            lambda: proxy.handshake_failures == 1, timeout_s=2, what="handshake failure"
        )
        assert echo.connections == 1


async def test_tls_handshake_waits_out_a_stall_then_completes(
    echo: EchoServer, dial: Dial, tls: TlsMaterial
) -> None:
    """A client connecting during a stall hangs in the handshake and gets through on resume."""
    with FaultProxy("127.0.0.1", echo.port, server_ssl=tls.server_context()) as proxy:
        proxy.stall()
        attempt = asyncio.create_task(dial(proxy.port, "localhost", ssl=tls.client_context()))
        done, _ = await asyncio.wait({attempt}, timeout=NOTHING_ARRIVES_S)
        assert not done
        await wait_until(lambda: proxy.active_connections == 1, timeout_s=2, what="the accept")
        assert echo.connections == 0

        assert proxy.resume() == 0  # the new connection is not reset
        streams = await asyncio.wait_for(attempt, timeout=5)
        assert await roundtrip(streams, b"through") == b"through"


def test_tls_material_files(tmp_path: Path) -> None:
    """Every file is PEM; the server cert names localhost and 127.0.0.1; the CAs differ."""
    material = make_tls_material(tmp_path / "pki")
    for path in vars(material).values():
        assert path.read_text().startswith("-----BEGIN ")
    server = x509.load_pem_x509_certificate(material.server_cert.read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    ca, wrong_ca = (
        x509.load_pem_x509_certificate(path.read_bytes())
        for path in (material.ca_file, material.wrong_ca_file)
    )
    assert server.issuer == ca.subject != wrong_ca.subject
    context = material.client_context()
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True)
