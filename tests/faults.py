"""Fault injection for tests: a TCP proxy a test can cut, stall or refuse, and TLS material.

:class:`FaultProxy` sits between a client and the broker. It runs in a thread of its own
with its own event loop, so it keeps forwarding (and obeying) while the test's loop is
busy or blocked, and sync and async tests drive it the same way. Every control call
blocks until the proxy has applied it (milliseconds: it never waits for the test's
loop, so calling it from an async test cannot deadlock).

Faults, and what the client sees:

* :meth:`FaultProxy.cut`: a dropped link. Every current connection is reset (RST) on
  both sides at once; new connections are accepted normally afterwards.
* :meth:`FaultProxy.stall`: a black hole. No byte is forwarded in either direction,
  sockets stay open. Connections accepted while stalled are held too: not connected
  upstream and, with TLS, not even handshaken, so the client's connect times out the
  way it does on a real partition.
* :meth:`FaultProxy.resume`: by default the connections that existed when the stall
  began are reset (dead after a partition: bytes buffered in the proxy are dropped),
  and the connections accepted during the stall start forwarding. A reconnect that a
  client began during the stall therefore completes, and a client that never noticed
  the stall sees its old connection reset and reconnects. ``resume(reset_stalled=False)``
  keeps the old connections instead and delivers what was buffered.
* :meth:`FaultProxy.refuse` / :meth:`FaultProxy.accept`: broker down. While refusing,
  each new connection is reset as soon as it is accepted (the client sees a reset
  rather than ``ECONNREFUSED``); current connections are untouched.

"Current connections" are those the proxy has accepted. A client's ``connect()`` returns
once the kernel has queued the connection, possibly before the proxy took it: a fault
that must hit it needs bytes through first (or ``active_connections`` to count it).

:func:`make_tls_material` writes a throw-away CA, server and client certificates, and an
unrelated "wrong" CA, for TLS tests; with ``FaultProxy(server_ssl=...)`` the proxy
terminates TLS and forwards plaintext to the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

import trustme

from tests.broker_env import broker_address

_T = TypeVar("_T")

_CHUNK = 64 * 1024
_CONTROL_TIMEOUT_S = 5.0
_CLOSE_TIMEOUT_S = 2.0
_HANDSHAKE_TIMEOUT_S = 10.0
_LINGER_RESET = struct.pack("ii", 1, 0)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close at once with an RST (SO_LINGER 0), as a dropped link looks to the peer."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.transport.abort()


async def _socket_closed(sock: Any, timeout_s: float) -> bool:
    """Wait (bounded) until the loop has really closed ``sock``.

    Polled: after a failed or cancelled TLS handshake no stream callback ever fires.
    """
    deadline = time.monotonic() + timeout_s
    while sock.fileno() != -1:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


class _Link:
    """One client connection and, once connected, its upstream connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.client_reader = reader
        self.client_writer = writer
        self.upstream_writer: asyncio.StreamWriter | None = None
        # The raw sockets, kept: an SSL transport stops exposing its socket once closed.
        self.sockets: list[Any] = [writer.get_extra_info("socket")]
        self.task: asyncio.Task[None] | None = None
        self._dead = False
        self.stalled = False  # open when a stall began: reset on resume()

    def set_upstream(self, writer: asyncio.StreamWriter) -> None:
        self.upstream_writer = writer
        self.sockets.append(writer.get_extra_info("socket"))

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client_writer, self.upstream_writer) if w is not None]

    def is_dead(self) -> bool:
        """True once reset: the pumps must forward nothing more."""
        return self._dead

    def reset(self) -> None:
        """Reset both sides (idempotent)."""
        self._dead = True
        for writer in self.writers():
            _reset(writer)

    async def close(self) -> None:
        """Close both sides gently if still open, then make sure the sockets are gone.

        A graceful close that does not finish in time (a TLS peer that never answers
        close_notify) is turned into a reset, so no transport outlives its link.
        """
        for writer in self.writers():
            if not writer.transport.is_closing():
                writer.close()
        for sock in self.sockets:
            if not await _socket_closed(sock, _CLOSE_TIMEOUT_S):
                self.reset()
                await _socket_closed(sock, _CLOSE_TIMEOUT_S)


class FaultProxy:
    """A TCP proxy to ``upstream_host:upstream_port`` that a test can break on demand.

    The upstream is the broker under test (:func:`tests.broker_env.broker_address`)
    unless given. Listens on ``127.0.0.1:`` :attr:`port` (a free port picked by the
    kernel). Use it as a context manager, or call :meth:`start` and :meth:`stop`. Control
    calls are thread-safe and return once applied; see the module docstring for each fault.
    """

    def __init__(
        self,
        upstream_host: str | None = None,
        upstream_port: int | None = None,
        *,
        server_ssl: ssl.SSLContext | None = None,
    ) -> None:
        broker_host, broker_port = broker_address()
        self.upstream_host = upstream_host or broker_host
        self.upstream_port = upstream_port or broker_port
        self.server_ssl = server_ssl
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None  # what ended the proxy's loop, if anything
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._flowing: asyncio.Event | None = None  # set unless stalled
        self._links: set[_Link] = set()
        self._port = 0
        self._refusing = False
        self._stopping = False
        self._adopting: set[asyncio.Task[None]] = set()  # accepted, stream not yet made
        self._refused_sockets: list[Any] = []  # reset outside a link: closed by stop()
        self._accepted_total = 0
        self._refused_total = 0
        self._handshake_failures = 0

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> Self:
        """Start the proxy thread; return once it listens."""
        if self._thread is not None:
            raise RuntimeError("FaultProxy already started")
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(_CONTROL_TIMEOUT_S):
            raise RuntimeError("FaultProxy did not start listening in time")
        if self._error is not None:
            self._thread.join(_CONTROL_TIMEOUT_S)
            raise RuntimeError("FaultProxy failed to start") from self._error
        return self

    def stop(self) -> None:
        """Reset every connection, stop listening and join the thread (idempotent).

        Never hangs: raises ``RuntimeError`` if the thread is not done within 5 s, or if
        the proxy's loop failed.
        """
        thread, loop, stop_requested = self._thread, self._loop, self._stop_requested
        if thread is None or not thread.is_alive():
            return
        if loop is not None and stop_requested is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stop_requested.set)
        thread.join(_CONTROL_TIMEOUT_S)
        if thread.is_alive():
            raise RuntimeError("FaultProxy thread did not stop within 5 s")
        if self._error is not None:
            raise RuntimeError("FaultProxy's loop failed") from self._error

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- addressing and counters -------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the proxy listens on (127.0.0.1)."""
        if not self._port:
            raise RuntimeError("FaultProxy is not started")
        return self._port

    def url(
        self,
        vhost: str,
        *,
        scheme: str = "amqp",
        user: str = "guest",
        password: str = "guest",  # noqa: S107 - the broker's well-known test account
        host: str = "127.0.0.1",
    ) -> str:
        """An AMQP URL to ``vhost`` through the proxy (percent-encoded like ``url_for_vhost``).

        Use ``scheme="amqps", host="localhost"`` with a TLS-terminating proxy.
        """
        credentials = f"{quote(user, safe='')}:{quote(password, safe='')}"
        return f"{scheme}://{credentials}@{host}:{self.port}/{quote(vhost, safe='')}"

    @property
    def active_connections(self) -> int:
        """Client connections open now (forwarding, stalled or mid-handshake)."""
        return len(self._links)

    @property
    def accepted_total(self) -> int:
        """Client connections accepted since start (refused ones not included)."""
        return self._accepted_total

    @property
    def refused_total(self) -> int:
        """Connections reset at once because the proxy was refusing."""
        return self._refused_total

    @property
    def handshake_failures(self) -> int:
        """Client TLS handshakes that failed (the proxy keeps serving)."""
        return self._handshake_failures

    def is_stalled(self) -> bool:
        """True between :meth:`stall` and :meth:`resume`."""
        return self._flowing is not None and not self._flowing.is_set()

    # -- faults ------------------------------------------------------------------------

    def cut(self) -> int:
        """Reset every current connection on both sides; return how many were cut.

        Stall and refuse states are unchanged: new connections are treated as before.
        """
        return self._call(self._cut)

    def stall(self) -> None:
        """Stop forwarding on every connection, current and new, keeping sockets open.

        Idempotent: a second call while stalled changes nothing.
        """
        self._call(self._stall)

    def resume(self, *, reset_stalled: bool = True) -> int:
        """End a stall; return how many connections were reset.

        By default connections that were open when the stall began are reset (their
        buffered bytes dropped) and those accepted during it start forwarding. With
        ``reset_stalled=False`` all connections carry on and buffered bytes are delivered.
        """
        return self._call(lambda: self._resume(reset_stalled))

    def refuse(self) -> None:
        """Reset each new connection as soon as it is accepted (broker down)."""
        self._call(self._set_refusing(True))

    def accept(self) -> None:
        """Accept new connections again after :meth:`refuse`."""
        self._call(self._set_refusing(False))

    # -- the proxy's thread ------------------------------------------------------------

    def _call(self, make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        """Run ``make()`` on the proxy's loop and wait for its result."""
        loop = self._loop
        if loop is None or self._thread is None or not self._thread.is_alive():
            raise RuntimeError("FaultProxy is not running")
        if threading.current_thread() is self._thread:
            raise RuntimeError("FaultProxy control calls must come from another thread")
        return asyncio.run_coroutine_threadsafe(make(), loop).result(_CONTROL_TIMEOUT_S)

    def _set_refusing(self, refusing: bool) -> Callable[[], Coroutine[Any, Any, None]]:
        async def apply() -> None:
            self._refusing = refusing

        return apply

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by start() or stop()
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        self._flowing = asyncio.Event()
        self._flowing.set()
        # Our own accept loop, not asyncio.start_server: on 3.11 a connection accepted just
        # before Server.close() fails Server._attach() and its socket leaks (ResourceWarning).
        loop = self._loop
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        loop.add_reader(listener.fileno(), self._accept_ready, listener)
        try:
            self._port = int(listener.getsockname()[1])
            self._ready.set()
            await self._stop_requested.wait()
        finally:
            self._stopping = True  # accepts still under way are reset
            loop.remove_reader(listener.fileno())
            listener.close()
            if self._adopting:
                await asyncio.wait(self._adopting, timeout=_CLOSE_TIMEOUT_S)
            await self._kill(list(self._links))
            for sock in self._refused_sockets:
                await _socket_closed(sock, _CLOSE_TIMEOUT_S)

    def _accept_ready(self, listener: socket.socket) -> None:
        """Accept what the backlog holds; each socket gets a stream pair (as start_server)."""
        loop = asyncio.get_running_loop()
        for _ in range(100):
            try:
                conn, _ = listener.accept()
            except OSError:  # BlockingIOError: backlog empty
                return
            conn.setblocking(False)
            task = loop.create_task(self._adopt(conn))
            self._adopting.add(task)
            task.add_done_callback(self._adopting.discard)

    async def _adopt(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        protocol = asyncio.StreamReaderProtocol(
            asyncio.StreamReader(loop=loop), self._on_accept, loop=loop
        )
        try:
            await loop.connect_accepted_socket(lambda: protocol, conn)
        except OSError:
            conn.close()

    def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing or self._stopping:
            self._refused_total += not self._stopping
            _reset(writer)
            self._refused_sockets = [s for s in self._refused_sockets if s.fileno() != -1]
            self._refused_sockets.append(writer.get_extra_info("socket"))
            return
        self._accepted_total += 1
        transport = writer.transport
        if self.server_ssl is not None and isinstance(transport, asyncio.Transport):
            # Leave the ClientHello in the socket: read now, it would be lost to start_tls.
            transport.pause_reading()
        link = _Link(reader, writer)
        self._links.add(link)
        link.task = asyncio.get_running_loop().create_task(self._serve(link))

    async def _serve(self, link: _Link) -> None:
        assert self._flowing is not None
        try:
            await self._flowing.wait()  # accepted while stalled: hold it, untouched
            if self.server_ssl is not None:
                try:
                    await link.client_writer.start_tls(
                        self.server_ssl, ssl_handshake_timeout=_HANDSHAKE_TIMEOUT_S
                    )
                except (OSError, TimeoutError):  # ssl.SSLError is an OSError
                    self._handshake_failures += 1
                    link.reset()
                    return
            upstream_reader, upstream_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
            link.set_upstream(upstream_writer)
            await asyncio.gather(
                self._pump(link, link.client_reader, upstream_writer),
                self._pump(link, upstream_reader, link.client_writer),
            )
        except OSError:  # upstream unreachable
            link.reset()
        finally:
            self._links.discard(link)
            await link.close()

    async def _pump(
        self, link: _Link, source: asyncio.StreamReader, sink: asyncio.StreamWriter
    ) -> None:
        """Copy ``source`` to ``sink`` while flowing; pass EOF on, reset both on errors."""
        assert self._flowing is not None
        try:
            while True:
                await self._flowing.wait()
                data = await source.read(_CHUNK)
                if not data or link.is_dead():
                    break
                await self._flowing.wait()  # a stall that began during the read
                if link.is_dead():
                    return
                sink.write(data)
                await sink.drain()
        except OSError:
            link.reset()
            return
        if link.is_dead():
            return
        with contextlib.suppress(OSError):
            if sink.can_write_eof():
                sink.write_eof()  # half-close: the other direction may still flow
            else:
                sink.close()  # TLS: close_notify

    async def _kill(self, links: list[_Link]) -> int:
        """Reset ``links`` and wait until their sockets are closed and tasks done."""
        for link in links:
            link.reset()
        tasks = [link.task for link in links if link.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2 * _CLOSE_TIMEOUT_S)
        return len(links)

    async def _cut(self) -> int:
        return await self._kill(list(self._links))

    async def _stall(self) -> None:
        assert self._flowing is not None
        if not self._flowing.is_set():
            return
        self._flowing.clear()
        for link in self._links:
            link.stalled = True

    async def _resume(self, reset_stalled: bool) -> int:
        assert self._flowing is not None
        if self._flowing.is_set():
            return 0
        doomed = [link for link in self._links if link.stalled]
        killed = await self._kill(doomed) if reset_stalled else 0
        for link in self._links:
            link.stalled = False
        self._flowing.set()
        return killed


# -- TLS material ----------------------------------------------------------------------


@dataclass(frozen=True)
class TlsMaterial:
    """PEM files of a throw-away PKI (made by :func:`make_tls_material`).

    The server certificate is valid for ``localhost`` and ``127.0.0.1``; the client
    certificate is signed by the same CA. ``wrong_ca_file`` is an unrelated CA, and
    ``wrong_client_cert``/``wrong_client_key`` a client certificate it signed: both must
    fail verification.
    """

    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    wrong_ca_file: Path
    wrong_client_cert: Path
    wrong_client_key: Path

    def server_context(self, *, require_client_cert: bool = False) -> ssl.SSLContext:
        """A server context with the server certificate (for ``FaultProxy(server_ssl=)``).

        With ``require_client_cert`` the handshake fails unless the client presents a
        certificate signed by :attr:`ca_file`.
        """
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.server_cert, self.server_key)
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.ca_file)
        return context

    def client_context(
        self,
        *,
        ca_file: Path | None = None,
        certfile: Path | None = None,
        keyfile: Path | None = None,
    ) -> ssl.SSLContext:
        """A verifying client context trusting ``ca_file`` (default: the test CA).

        ``certfile``/``keyfile`` present a client certificate.
        """
        context = ssl.create_default_context(cafile=str(ca_file or self.ca_file))
        if certfile is not None:
            context.load_cert_chain(certfile, keyfile)
        return context


def make_tls_material(directory: Path) -> TlsMaterial:
    """Create a CA, server and client certificates, and a wrong CA under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, wrong_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("client.test", common_name="amqp-agents-test-client")
    wrong_client = wrong_ca.issue_cert("client.test", common_name="amqp-agents-test-client")

    def write(name: str, blob: trustme.Blob) -> Path:
        path = directory / name
        blob.write_to_path(str(path))
        return path

    return TlsMaterial(
        ca_file=write("ca.pem", ca.cert_pem),
        server_cert=write("server.pem", server.cert_chain_pems[0]),
        server_key=write("server.key", server.private_key_pem),
        client_cert=write("client.pem", client.cert_chain_pems[0]),
        client_key=write("client.key", client.private_key_pem),
        wrong_ca_file=write("wrong-ca.pem", wrong_ca.cert_pem),
        wrong_client_cert=write("wrong-client.pem", wrong_client.cert_chain_pems[0]),
        wrong_client_key=write("wrong-client.key", wrong_client.private_key_pem),
    )
