"""Queue depth, the headline metric: a background probe of every queue that matters.

Every ``interval_s`` it asks the broker for each queue's ready messages and consumers
(a passive declare, on a throw-away channel of its own in the RabbitMQ transport), and
sets ``amqp_agents_queue_depth`` / ``amqp_agents_queue_consumers``. A queue that is
gone (deleted, or its cluster node down) reads as 0 messages and 0 consumers, never
its last values, so a ``QueueWithoutConsumers`` alert can fire; it also counts
``queue_depth_errors_total``. A broker hiccup only counts the error and leaves the
last values. Probing never disturbs consuming, and never fails a scrape. Each probe
is bounded.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from amqp_agents.errors import AmqpAgentsError, QueueNotFoundError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from amqp_agents.metrics import Metrics
    from amqp_agents.transport.base import Transport

__all__ = ["QueueMonitor"]

log = logging.getLogger(__name__)


class QueueMonitor:
    """Polls the depth and consumers of ``queues()`` into ``metrics``."""

    def __init__(
        self,
        transport: Transport,
        metrics: Metrics,
        queues: Callable[[], Iterable[str]],
        *,
        interval_s: float = 5.0,
        probe_timeout_s: float = 5.0,
    ) -> None:
        self._transport = transport
        self._metrics = metrics
        self._queues = queues
        self._interval_s = interval_s
        self._probe_timeout_s = probe_timeout_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start polling in the background (first probe at once)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def aclose(self) -> None:
        """Stop polling. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # Bounded: a probe stuck in the client library must not hold up a shutdown.
            await asyncio.wait({task}, timeout=5)

    async def probe(self) -> None:
        """Probe every queue once."""
        for queue in list(self._queues()):
            try:
                async with asyncio.timeout(self._probe_timeout_s):
                    info = await self._transport.queue_info(queue)
            except (AmqpAgentsError, TimeoutError) as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # We are being stopped; the client library turned the cancellation
                    # into a link error. Don't keep probing a dead connection.
                    raise asyncio.CancelledError from exc
                self._metrics.queue_depth_errors.labels(queue).inc()
                log.debug("depth probe of %s failed: %s", queue, exc)
                if isinstance(exc, QueueNotFoundError):
                    self._metrics.queue_depth.labels(queue).set(0)
                    self._metrics.queue_consumers.labels(queue).set(0)
                continue
            self._metrics.queue_depth.labels(queue).set(info.messages)
            self._metrics.queue_consumers.labels(queue).set(info.consumers)

    async def _run(self) -> None:
        while True:
            await self.probe()
            await asyncio.sleep(self._interval_s)
