"""A caller's reply queue: one exclusive queue, replies routed by correlation id.

Shared by the RPC client (one reply per call) and the event bus (scatter-gather,
many replies per correlation id). The queue is server-named, exclusive and
auto-deleted: it belongs to this connection and vanishes with it, so a restarted
caller never inherits stale replies. It is consumed in no-ack mode (a reply nobody
waits for is worthless), which also saves an ack per reply.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from amqp_agents.transport.base import QueueSpec

if TYPE_CHECKING:
    from amqp_agents.models.envelope import Envelope
    from amqp_agents.transport.base import ConsumerHandle, Delivery, Transport

__all__ = ["ReplyQueue"]

log = logging.getLogger(__name__)

ReplyCallback = Callable[["Envelope"], None]
Waiter = asyncio.Future[Any] | ReplyCallback
"""A future (resolved with the first reply: one-shot calls) or a callback (every reply)."""


class ReplyQueue:
    """Routes replies to whoever registered their correlation id with :meth:`expect`."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._name = ""
        self._consumer: ConsumerHandle | None = None
        self._waiting: dict[str, Waiter] = {}
        self.unmatched = 0
        """Replies that matched no registered correlation id (late or unknown)."""

    @property
    def name(self) -> str:
        """The queue's name: what requests carry as ``reply_to``."""
        return self._name

    @property
    def waiting(self) -> int:
        """Correlation ids currently registered."""
        return len(self._waiting)

    async def start(self) -> None:
        """Declare the queue and start consuming it."""
        self._name = await self._transport.declare_queue(
            QueueSpec(name="", durable=False, exclusive=True, auto_delete=True)
        )
        self._consumer = await self._transport.consume(
            self._name, self._on_reply, prefetch=0, no_ack=True
        )

    async def restart(self) -> None:
        """After a reconnect: a new queue (the old one died with its connection).

        Registrations stay; replies sent to the old name are lost, which is why the
        RPC client fails (or re-sends) its pending calls when the link dies.
        """
        old, self._consumer = self._consumer, None
        if old is not None:
            await old.close()  # a no-op on a dead channel; frees it otherwise
        await self.start()

    async def aclose(self) -> None:
        """Stop consuming (the broker deletes the queue). Idempotent."""
        consumer = self._consumer
        if consumer is not None:
            await consumer.close()  # forgotten only once closed: a cancelled aclose
            self._consumer = None  # can be finished by calling it again

    def expect(self, correlation_id: str, waiter: Waiter) -> None:
        """Route replies with this id to ``waiter`` until :meth:`forget`.

        A future gets the first reply (duplicates are dropped); a callback gets each.
        Storing the caller's future itself, not a wrapper, keeps a pending call small.
        """
        self._waiting[correlation_id] = waiter

    def forget(self, correlation_id: str) -> None:
        """Stop routing this id; later replies count as :attr:`unmatched`."""
        self._waiting.pop(correlation_id, None)

    def waiter(self, correlation_id: str) -> Waiter | None:
        """Who waits for this id, if anyone."""
        return self._waiting.get(correlation_id)

    def is_waiting(self, correlation_id: str) -> bool:
        """True while the id is registered."""
        return correlation_id in self._waiting

    def drain(self) -> dict[str, Waiter]:
        """Remove and return every registration (to fail them all at once)."""
        waiting, self._waiting = self._waiting, {}
        return waiting

    async def _on_reply(self, delivery: Delivery) -> None:
        envelope = delivery.envelope
        waiter = self._waiting.get(envelope.correlation_id or "")
        if waiter is None:
            self.unmatched += 1
        elif isinstance(waiter, asyncio.Future):
            if not waiter.done():
                waiter.set_result(envelope)
        else:
            try:
                waiter(envelope)
            except Exception:
                log.exception("reply callback failed (correlation id %s)", envelope.correlation_id)
