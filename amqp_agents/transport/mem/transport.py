"""``InMemoryTransport``: the :class:`~amqp_agents.transport.base.Transport` on an
:class:`~amqp_agents.transport.mem.broker.InMemoryBroker`, one connection to it.

It checks the connection's state and ownership, then asks the broker; it also drives
the faults tests inject (a lost connection, a reconnect, a channel error, an alarm).
"""

from __future__ import annotations

import asyncio
import logging
import time
from enum import Enum
from typing import TYPE_CHECKING, Self

from amqp_agents.errors import BrokerUnavailableError, LifecycleError
from amqp_agents.transport.base import (
    ConnectionCallbacks,
    EndReason,
    QueueInfo,
    blocked_too_long,
    not_restored_in_time,
)
from amqp_agents.transport.mem.broker import InMemoryBroker
from amqp_agents.transport.mem.consumer import Consumer

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from amqp_agents.models.envelope import Envelope
    from amqp_agents.models.topology import QueueSpec
    from amqp_agents.transport.base import (
        ConsumerHandle,
        DeliveryHandler,
        EndCallback,
        ExchangeKind,
    )

__all__ = ["InMemoryTransport"]

log = logging.getLogger("amqp_agents.transport.memory")


class _State(Enum):
    NEW = "new"
    CONNECTED = "connected"
    LOST = "lost"
    CLOSED = "closed"


class InMemoryTransport:
    """:class:`~amqp_agents.transport.base.Transport` on an :class:`InMemoryBroker`."""

    def __init__(self, broker: InMemoryBroker | None = None) -> None:
        self.broker = broker if broker is not None else InMemoryBroker()
        self._state = _State.NEW
        self._consumers: list[Consumer] = []
        self._callbacks = ConnectionCallbacks()
        self._usable = asyncio.Event()
        self._coming_back = False
        self._blocked = False
        self.reconnects = 0
        """Connections re-established after a loss (:meth:`simulate_reconnect`)."""

    def __repr__(self) -> str:
        return f"<InMemoryTransport {self._state.value}>"

    @property
    def is_connected(self) -> bool:
        return self._state is _State.CONNECTED

    @property
    def connected_to(self) -> str | None:
        """``memory://`` while connected."""
        return "memory://" if self._state is _State.CONNECTED else None

    @property
    def is_blocked(self) -> bool:
        return self._blocked

    @property
    def will_reconnect(self) -> bool:
        """After a loss: whether :meth:`simulate_connection_loss` said a
        :meth:`simulate_reconnect` is coming; before one: false."""
        return self._state is not _State.CLOSED and self._coming_back

    async def connect(self) -> None:
        if self._state is not _State.NEW:
            raise LifecycleError(f"transport is {self._state.value}; connect() runs once")
        self._state = _State.CONNECTED
        self._usable.set()

    async def aclose(self) -> None:
        if self._state is _State.CLOSED:
            return
        was_connected = self._state is _State.CONNECTED
        self._state = _State.CLOSED
        self._usable.set()  # wake waiting publishes: they fail at once
        if was_connected:
            self._drop_connection()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def on_connection_lost(
        self, callback: Callable[[BaseException | None], None]
    ) -> Callable[[], None]:
        return self._callbacks.on_lost(callback)

    def on_connection_restored(self, callback: Callable[[], Awaitable[None]]) -> Callable[[], None]:
        return self._callbacks.on_restored(callback)

    def simulate_connection_loss(
        self, reason: BaseException | None = None, *, will_reconnect: bool = False
    ) -> None:
        """Drop this connection like a cut TCP link (for fault-injection tests).

        Its consumers vanish, their unacked deliveries return to their queues as
        redelivered, its exclusive queues are deleted, and the connection-lost
        callbacks run once. Other operations then raise ``BrokerUnavailableError``;
        publishes do too, unless ``will_reconnect`` says a :meth:`simulate_reconnect`
        is coming: then they wait for it within their timeout (as a reconnecting
        RabbitMQ transport does).
        """
        if self._state is not _State.CONNECTED:
            return
        self._state = _State.LOST
        self._coming_back = will_reconnect
        self._usable.clear()
        text = "connection lost" if reason is None else f"{type(reason).__name__}: {reason}"
        for consumer in list(self._consumers):
            consumer.end(EndReason.CONNECTION_LOST, None, text)
        self._drop_connection()
        self._callbacks.report_lost(reason)

    async def simulate_reconnect(self) -> None:
        """Come back after :meth:`simulate_connection_loss`: the restored callbacks run
        (owners re-declare and re-consume), then waiting publishes go on."""
        if self._state is not _State.LOST:
            raise LifecycleError(f"transport is {self._state.value}, not lost")
        self._state = _State.CONNECTED
        await self._callbacks.restore(stop_at_failure=False)
        self.reconnects += 1
        if not self._blocked:
            self._usable.set()

    def simulate_channel_close(
        self, consumer: ConsumerHandle, *, code: int = 406, text: str = "PRECONDITION_FAILED"
    ) -> None:
        """Close one consumer's channel as the broker does on a channel error: its
        unacked deliveries are requeued, and it reports ``channel_closed`` with the code."""
        if not isinstance(consumer, Consumer) or consumer.transport is not self:
            raise LifecycleError("not a consumer of this transport")
        consumer.end(EndReason.CHANNEL_CLOSED, code, text)

    def simulate_blocked(self, blocked: bool) -> None:
        """Start or end a broker resource alarm: publishes wait while blocked."""
        self._blocked = blocked
        if blocked:
            self._usable.clear()
        elif self._state is _State.CONNECTED:
            self._usable.set()

    def forget(self, consumer: Consumer) -> None:
        """A consumer's channel closed: it is no longer this connection's."""
        if consumer in self._consumers:
            self._consumers.remove(consumer)

    def _drop_connection(self) -> None:
        consumers, self._consumers = self._consumers, []
        for consumer in consumers:
            consumer.close_channel()
        for queue in list(self.broker.queues()):
            if queue.owner is self:
                self.broker.remove(queue)

    def _require_connected(self) -> None:
        if self._state is _State.CONNECTED:
            return
        if self._state is _State.LOST:
            raise BrokerUnavailableError("the broker connection is lost")
        raise LifecycleError(f"transport is {self._state.value}, not connected")

    # -- topology --------------------------------------------------------------------

    async def declare_exchange(
        self, name: str, kind: ExchangeKind, *, durable: bool = True
    ) -> None:
        self._require_connected()
        self.broker.declare_exchange(name, kind, durable)

    async def declare_queue(self, spec: QueueSpec) -> str:
        self._require_connected()
        return self.broker.declare_queue(spec, self)

    async def bind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        self._require_connected()
        self.broker.bind(queue, exchange, routing_key)

    async def unbind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        self._require_connected()
        self.broker.unbind(queue, exchange, routing_key)

    async def delete_queue(self, queue: str) -> int:
        self._require_connected()
        found = self.broker.find(queue)
        if found is not None:
            self.broker.check_owner(found, self)
        return self.broker.delete_queue(queue)

    async def queue_info(self, queue: str) -> QueueInfo:
        self._require_connected()
        found = self.broker.queue(queue)
        self.broker.check_owner(found, self)
        self.broker.expire_heads(found, time.monotonic())
        return QueueInfo(queue, found.ready, len(found.consumers))

    # -- messages --------------------------------------------------------------------

    async def publish(
        self,
        envelope: Envelope,
        *,
        mandatory: bool = False,
        confirm: bool = True,
        timeout_s: float,
    ) -> None:
        if self._state is not _State.CONNECTED or self._blocked:
            await self._wait_usable(timeout_s)
            self._require_connected()
        # Like the RabbitMQ transport, a return is only reported on confirmed publishes.
        self.broker.publish(envelope, mandatory=mandatory and confirm, confirm=confirm)

    async def _wait_usable(self, timeout_s: float) -> None:
        if self._state is _State.LOST and not self._coming_back:
            raise BrokerUnavailableError("the broker connection is lost")
        if self._state is not _State.LOST and not self._blocked:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await self._usable.wait()
        except TimeoutError:
            if self._blocked:
                raise blocked_too_long(timeout_s) from None
            raise not_restored_in_time(timeout_s) from None

    async def consume(
        self,
        queue: str,
        handler: DeliveryHandler,
        *,
        prefetch: int,
        no_ack: bool = False,
        on_end: EndCallback | None = None,
    ) -> ConsumerHandle:
        self._require_connected()
        target = self.broker.queue(queue)
        self.broker.check_owner(target, self)
        consumer = Consumer(self, queue, handler, prefetch, no_ack, on_end)
        target.consumers.append(consumer)
        target.had_consumer = True
        self._consumers.append(consumer)
        self.broker.pump(target)
        return consumer
