"""Keep a worker serving when its consumers cannot heal in place, and connect at start.

The first line of recovery is in place: the transport reconnects by itself and the
worker's :class:`~amqp_agents.transport.recovery.Recovery` re-declares and
re-consumes whatever ended (a deleted queue, a closed channel, a lost link). When
that does not work within the worker's ``reattach_limit_s`` (or the transport does
not reconnect), :meth:`Worker.serve` raises ``BrokerUnavailableError``; the
supervisor then throws the transport and the worker away, connects again with
exponential backoff and full jitter, and starts a *fresh* worker. Deliveries of the
dead connection were requeued by the broker; their settlements are dropped.

Stops when ``stop`` is set (a graceful stop of the current worker), and gives up only
on errors no retry can fix: refused credentials or vhost (``AccessRefusedError``), a
topology mismatch, bad configuration. An unreachable broker is retried, at start too,
and so is a worker that cannot start because a queue's node is down; the pause between
fresh workers grows (backoff with jitter) while they keep ending soon after starting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import TYPE_CHECKING

from amqp_agents.errors import BrokerUnavailableError

if TYPE_CHECKING:
    from collections.abc import Callable

    from amqp_agents.metrics import Metrics
    from amqp_agents.runtime.worker import Worker
    from amqp_agents.transport.base import Transport

__all__ = ["Supervisor"]

log = logging.getLogger(__name__)


class Supervisor:
    """Runs ``build_worker(transport)`` on ``open_transport()``, reconnecting on loss."""

    def __init__(
        self,
        open_transport: Callable[[], Transport],
        build_worker: Callable[[Transport], Worker],
        *,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        metrics: Metrics | None = None,
    ) -> None:
        self._open_transport = open_transport
        self._build_worker = build_worker
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._metrics = metrics
        self.worker: Worker | None = None
        """The worker serving now (None while connecting)."""
        self.reconnects = 0
        """Connections re-established after a loss."""
        self._connected_before = False

    @property
    def is_ready(self) -> bool:
        """A worker is serving with every consumer attached."""
        return self.worker is not None and self.worker.is_ready

    @property
    def is_blocked(self) -> bool:
        """The broker blocks the current worker's publishing (a resource alarm)."""
        return self.worker is not None and self.worker.is_blocked

    @property
    def consumers_lost(self) -> bool:
        """The current worker's consumers did not heal in time (liveness should fail)."""
        return self.worker is not None and self.worker.consumers_lost

    def liveness_failure(self) -> str | None:
        """Why the current worker should be restarted (``/healthz`` 503), or ``None``."""
        return None if self.worker is None else self.worker.liveness_failure()

    def not_ready_reason(self) -> str | None:
        """Why the process is not ready (the ``/readyz`` body), ``None`` if it is."""
        if self.worker is None:
            return "connecting to the broker"
        return self.worker.not_ready_reason()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; reconnect after every lost connection."""
        failures = 0
        restarts = 0  # workers in a row that ended soon after they started
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            transport = self._open_transport()
            try:
                await transport.connect()
            except BrokerUnavailableError as exc:
                failures += 1
                delay = self._backoff(failures)
                log.warning("broker unavailable (%s); retrying in %.1fs", exc, delay)
                await _sleep_unless(stop, delay)
                continue
            if self._connected_before:
                self.reconnects += 1
                if self._metrics is not None:
                    self._metrics.reconnects.inc()
                log.info("reconnected to the broker (reconnect %d)", self.reconnects)
            self._connected_before = True
            failures = 0
            worker = self._build_worker(transport)
            self.worker = worker
            started = loop.time()
            try:
                await worker.serve(shutdown_trigger=stop.wait)
                return  # a graceful stop
            except BrokerUnavailableError as exc:
                log.warning("%s; starting over on a new connection", exc)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling() > 0:
                    raise  # we are being cancelled
                # A cancellation nobody asked for (a dying link's, surfacing from the
                # worker's stop): never end the supervisor silently over it.
                log.error("the worker ended by a stray cancellation; reconnecting")
            finally:
                self.worker = None
                await transport.aclose()
            # A worker that cannot even start (its queue's node is down, say) must not be
            # rebuilt every half second: the pause grows while workers keep ending soon
            # after they start, and starts small again after one that served a while.
            settled = loop.time() - started > self._backoff_max_s
            restarts = 1 if settled else restarts + 1
            await _sleep_unless(stop, self._backoff(restarts))

    def _backoff(self, failures: int) -> float:
        """Full jitter: uniform in [0, min(max, initial * 2**(failures-1))]."""
        ceiling = min(self._backoff_max_s, self._backoff_initial_s * 2 ** max(failures - 1, 0))
        return random.uniform(0, ceiling)  # noqa: S311  # jitter, not cryptography


async def _sleep_unless(stop: asyncio.Event, delay_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(delay_s):
            await stop.wait()
