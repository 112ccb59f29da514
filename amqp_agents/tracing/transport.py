"""The traced transport: a :class:`~amqp_agents.transport.base.Transport` around another
one, whose publishes, deliveries and settlements go through a :class:`Tracing`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opentelemetry.trace import Status, StatusCode

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine

    from opentelemetry.trace import Span

    from amqp_agents.models.envelope import Envelope
    from amqp_agents.tracing.spans import Processing, Tracing
    from amqp_agents.transport.base import (
        ConsumerHandle,
        Delivery,
        DeliveryHandler,
        EndCallback,
        ExchangeKind,
        QueueInfo,
        QueueSpec,
        Transport,
    )

__all__ = ["TracedDelivery", "TracedTransport", "fail"]


class TracedDelivery:
    """A delivery whose settlement is a settle span."""

    __slots__ = ("_delivery", "_scope")

    def __init__(self, delivery: Delivery, scope: Processing) -> None:
        self._delivery = delivery
        self._scope = scope

    @property
    def envelope(self) -> Envelope:
        return self._delivery.envelope

    async def ack(self) -> None:
        await self._settle("ack", self._delivery.ack())

    async def nack(self, *, requeue: bool = True) -> None:
        if not requeue:
            self._scope.fail("rejected")
        await self._settle("nack", self._delivery.nack(requeue=requeue))

    async def reject(self) -> None:
        self._scope.fail("rejected")
        await self._settle("reject", self._delivery.reject())

    async def _settle(self, operation: str, settling: Awaitable[None]) -> None:
        span = self._scope.settle(operation)
        try:
            await settling
        except BaseException as exc:
            fail(span, type(exc).__qualname__, str(exc))
            raise
        finally:
            span.end()


class TracedTransport:
    """A transport that traces around another one (see the module docstring)."""

    __slots__ = ("inner", "tracing")

    def __init__(self, inner: Transport, tracing: Tracing) -> None:
        self.inner = inner
        self.tracing = tracing

    @property
    def is_connected(self) -> bool:
        return self.inner.is_connected

    @property
    def is_blocked(self) -> bool:
        return self.inner.is_blocked

    @property
    def will_reconnect(self) -> bool:
        return self.inner.will_reconnect

    @property
    def connected_to(self) -> str | None:
        return self.inner.connected_to

    async def connect(self) -> None:
        await self.inner.connect()

    async def aclose(self) -> None:
        await self.inner.aclose()

    def on_connection_lost(
        self, callback: Callable[[BaseException | None], None]
    ) -> Callable[[], None]:
        return self.inner.on_connection_lost(callback)

    def on_connection_restored(self, callback: Callable[[], Awaitable[None]]) -> Callable[[], None]:
        return self.inner.on_connection_restored(callback)

    async def declare_exchange(
        self, name: str, kind: ExchangeKind, *, durable: bool = True
    ) -> None:
        await self.inner.declare_exchange(name, kind, durable=durable)

    async def declare_queue(self, spec: QueueSpec) -> str:
        return await self.inner.declare_queue(spec)

    async def bind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        await self.inner.bind_queue(queue, exchange, routing_key)

    async def unbind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        await self.inner.unbind_queue(queue, exchange, routing_key)

    async def queue_info(self, queue: str) -> QueueInfo:
        return await self.inner.queue_info(queue)

    async def delete_queue(self, queue: str) -> int:
        return await self.inner.delete_queue(queue)

    def publish(
        self,
        envelope: Envelope,
        *,
        mandatory: bool = False,
        confirm: bool = True,
        timeout_s: float,
    ) -> Coroutine[Any, Any, None]:
        # Not a coroutine of its own: without an SDK the inner publish is all there is.
        return self.tracing.publish(self.inner, envelope, mandatory, confirm, timeout_s)

    async def consume(
        self,
        queue: str,
        handler: DeliveryHandler,
        *,
        prefetch: int,
        no_ack: bool = False,
        on_end: EndCallback | None = None,
    ) -> ConsumerHandle:
        # Replies (no-ack) are the call span's business: no process span per reply.
        if not no_ack:
            handler = self.tracing.processing(queue, handler)
        return await self.inner.consume(
            queue, handler, prefetch=prefetch, no_ack=no_ack, on_end=on_end
        )


def fail(span: Span, error_type: str, description: str | None) -> None:
    """Mark ``span`` failed: ``error.type`` and an error status."""
    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR, description))
