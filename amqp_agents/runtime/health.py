"""A tiny HTTP server for probes (``/healthz``, ``/readyz``) and ``/metrics``.

Built on ``asyncio.start_server`` so a worker needs no web framework. It answers
``GET`` only, one request per connection, and every read is bounded in size and time
so a slow or hostile client cannot pin it. A probe is a plain function, or a coroutine
function when its answer needs I/O (the parent of ``--processes`` asks its children);
such a probe must bound its own waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from amqp_agents.errors import ConfigurationError

__all__ = ["HealthServer", "LoopWatch", "Probe", "ProbeResult"]

log = logging.getLogger(__name__)

_READ_TIMEOUT_S = 5.0
_MAX_REQUEST_LINE = 8192


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What a route answers."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Probe = Callable[[], ProbeResult | Awaitable[ProbeResult]]


class LoopWatch:
    """Measures how late the event loop wakes up: a blocked loop shows as lag.

    A task sleeps ``tick_s`` at a time and records how much later than asked it woke.
    ``/healthz`` reads :attr:`lag_s` (the worst of the last few seconds) so a loop that
    was blocked long enough to starve consumers fails liveness once it can answer.
    """

    def __init__(self, *, tick_s: float = 0.25, window_s: float = 10.0) -> None:
        self._tick_s = tick_s
        self._window = max(1, int(window_s / tick_s))
        self._lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def lag_s(self) -> float:
        """The largest lag seen in the window."""
        return max(self._lags, default=0.0)

    def start(self) -> None:
        """Start measuring."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def aclose(self) -> None:
        """Stop measuring. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=5)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            await asyncio.sleep(self._tick_s)
            self._lags.append(max(loop.time() - asked - self._tick_s, 0.0))
            del self._lags[: -self._window]


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HealthServer:
    """Serves ``routes`` (path -> probe) on ``host:port``; ``port=0`` picks a free one."""

    def __init__(self, routes: Mapping[str, Probe], *, host: str = "0.0.0.0", port: int) -> None:  # noqa: S104  # probes must be reachable from the kubelet
        self._routes = dict(routes)
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with ``port=0``)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Listen.

        Raises:
            ConfigurationError: the address cannot be bound (port in use, no permission).
        """
        try:
            self._server = await asyncio.start_server(
                self._serve, self._host, self._port, limit=_MAX_REQUEST_LINE
            )
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve probes on {self._host}:{self._port}: {exc.strerror or exc}"
            ) from None

    async def aclose(self) -> None:
        """Stop listening. Idempotent."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), timeout=2)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                request_line = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
            parts = request_line.decode("latin-1").split()
            if len(parts) < 2:
                return
            method, path = parts[0], parts[1].split("?", 1)[0]
            probe = self._routes.get(path)
            if method != "GET":
                result = ProbeResult(405, b"method not allowed\n")
            elif probe is None:
                result = ProbeResult(404, b"not found\n")
            else:
                answer = probe()
                result = await answer if inspect.isawaitable(answer) else answer
            reason = _REASONS.get(result.status, "")
            head = (
                f"HTTP/1.1 {result.status} {reason}\r\n"
                f"Content-Type: {result.content_type}\r\n"
                f"Content-Length: {len(result.body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + result.body)
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        except Exception:
            log.exception("probe server failed on a request")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), timeout=1)
