"""A caller's reply queue: one exclusive queue, replies routed by correlation id.

Shared by the RPC client (one reply per call) and the event bus (scatter-gather,
many replies per correlation id). The queue is server-named, exclusive and
auto-deleted: it belongs to this connection and vanishes with it, so a restarted
caller never inherits stale replies. It is consumed in no-ack mode (a reply nobody
waits for is worthless), which also saves an ack per reply.

The queue is a :class:`~amqp_agents.transport.recovery.Recovery` attachment: when it
ends (deleted, its channel closed, the connection lost) a new one is declared and
consumed, and :attr:`ReplyQueue.name` changes. Replies sent to the old name are lost,
so the owner's ``on_lost`` hook fails (or re-sends) the calls waiting for them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from amqp_agents.models.topology import Topology

if TYPE_CHECKING:
    from amqp_agents.models.envelope import Envelope
    from amqp_agents.transport.base import ConsumerEnd, Delivery
    from amqp_agents.transport.recovery import Attachment, Recovery

__all__ = ["ReplyQueue"]

log = logging.getLogger(__name__)

ReplyCallback = Callable[["Envelope"], None]
Waiter = asyncio.Future[Any] | ReplyCallback
"""A future (resolved with the first reply: one-shot calls) or a callback (every reply)."""


class ReplyQueue:
    """Routes replies to whoever registered their correlation id with :meth:`expect`."""

    def __init__(
        self, recovery: Recovery, *, on_lost: Callable[[ConsumerEnd], None] | None = None
    ) -> None:
        self._recovery = recovery
        self._on_lost = on_lost
        self._attachment: Attachment | None = None
        self._waiting: dict[str, Waiter] = {}
        self.live = asyncio.Event()
        """Set while the queue is consumed (cleared from its end until it is back)."""
        self.unmatched = 0
        """Replies that matched no registered correlation id (late or unknown)."""

    @property
    def name(self) -> str:
        """The queue's name: what requests carry as ``reply_to``."""
        return "" if self._attachment is None else self._attachment.queue

    @property
    def waiting(self) -> int:
        """Correlation ids currently registered."""
        return len(self._waiting)

    async def start(self) -> None:
        """Declare the queue and start consuming it (re-attached whenever it ends)."""
        transport = self._recovery.transport

        async def declare() -> str:
            return await transport.declare_queue(Topology.private_queue_spec())

        self._attachment = await self._recovery.attach(
            declare, self._on_reply, prefetch=0, no_ack=True, label="replies", on_end=self._lost
        )
        self.live = self._attachment.attached

    def _lost(self, end: ConsumerEnd) -> None:
        if self._on_lost is not None:
            self._on_lost(end)

    async def aclose(self) -> None:
        """Stop consuming (the broker deletes the queue). Idempotent."""
        attachment = self._attachment
        if attachment is not None:
            await attachment.close()  # forgotten only once closed: a cancelled aclose
            self._recovery.forget(attachment)  # can be finished by calling it again
            self._attachment = None

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
