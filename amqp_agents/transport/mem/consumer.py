"""Consumers and deliveries of the in-memory broker, each on its own virtual channel.

Private to :mod:`amqp_agents.transport.mem`. As with aiormq, each delivery runs in a
task of its own (so handlers wait independently and are cancelled when the channel
closes); a no-ack delivery starts from the loop and takes a task only if it suspends.
A settlement after the channel closed is a no-op (the broker has requeued it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import types
from typing import TYPE_CHECKING, Any

from amqp_agents.transport.base import ConsumerEnd, EndReason, report_end

if TYPE_CHECKING:
    from collections.abc import Coroutine, Generator

    from amqp_agents.transport.base import DeliveryHandler, EndCallback
    from amqp_agents.transport.mem.queues import Message
    from amqp_agents.transport.mem.transport import InMemoryTransport

__all__ = ["Consumer", "MemoryDelivery"]

log = logging.getLogger("amqp_agents.transport.memory")


class MemoryDelivery:
    """A delivery of one consumer; settling it returns capacity to the consumer."""

    __slots__ = ("_consumer", "_message", "_settled", "_tag", "envelope")

    def __init__(self, consumer: Consumer, message: Message, tag: int) -> None:
        self._consumer = consumer
        self._message = message
        self._tag = tag
        self._settled = consumer.no_ack
        stored = message.envelope
        self.envelope = (
            dataclasses.replace(stored, redelivered=True) if message.redelivered else stored
        )

    async def ack(self) -> None:
        if self._settle():
            self._consumer.broker.settled(self._consumer.queue_name)

    async def nack(self, *, requeue: bool = True) -> None:
        if self._settle():
            broker = self._consumer.broker
            if requeue:
                broker.requeue(self._consumer.queue_name, self._message)
            else:
                broker.reject(self._consumer.queue_name, self._message)

    async def reject(self) -> None:
        await self.nack(requeue=False)

    def _settle(self) -> bool:
        # Once, and only while the consumer's channel lives (else: the broker has
        # requeued it already, as RabbitMQ does when a channel closes).
        if self._settled or self._consumer.closed:
            return False
        self._settled = True
        self._consumer.unacked.pop(self._tag, None)
        return True


class Consumer:
    """A consumer on its own (virtual) channel, as the RabbitMQ transport does."""

    __slots__ = (
        "asked",
        "broker",
        "cancelled",
        "closed",
        "ended",
        "handler",
        "loop",
        "no_ack",
        "on_end",
        "prefetch",
        "queue_name",
        "tasks",
        "transport",
        "unacked",
    )

    def __init__(
        self,
        transport: InMemoryTransport,
        queue: str,
        handler: DeliveryHandler,
        prefetch: int,
        no_ack: bool,
        on_end: EndCallback | None,
    ) -> None:
        self.transport = transport
        self.on_end = on_end
        self.ended: ConsumerEnd | None = None
        self.asked = False
        self.broker = transport.broker
        self.queue_name = queue
        self.handler = handler
        self.prefetch = prefetch
        self.no_ack = no_ack
        self.unacked: dict[int, Message] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}
        """Running deliveries by tag (each removes itself: no done callback to schedule)."""
        self.loop = asyncio.get_running_loop()
        self.cancelled = False
        self.closed = False

    @property
    def queue(self) -> str:
        return self.queue_name

    def has_room(self) -> bool:
        return self.no_ack or self.prefetch <= 0 or len(self.unacked) < self.prefetch

    def deliver(self, message: Message) -> None:
        tag = self.broker.next_tag()
        if not self.no_ack:
            self.unacked[tag] = message
        delivery = MemoryDelivery(self, message, tag)
        if self.no_ack:
            self.loop.call_soon(self._start_no_ack, delivery, tag)
        else:
            self.tasks[tag] = self.loop.create_task(self._run(delivery, tag))

    def _start_no_ack(self, delivery: MemoryDelivery, tag: int) -> None:
        """Run a no-ack handler's first step from the loop; a task only if it suspends.

        A reply handler (the no-ack consumer the library has) finishes in its first
        step: it files the reply and returns. A task per reply would double the
        scheduling cost of an in-memory round trip.
        """
        if self.closed:
            return
        coro = self._run(delivery, tag)
        try:
            yielded = coro.send(None)
        except StopIteration:
            return
        self.tasks[tag] = self.loop.create_task(_carry_on(coro, yielded))

    async def _run(self, delivery: MemoryDelivery, tag: int) -> None:
        try:
            await self.handler(delivery)
        except Exception:
            log.exception("consumer of %s failed", self.queue_name)
        finally:
            self.tasks.pop(tag, None)

    def detach(self) -> None:
        """Stop receiving (basic.cancel): leave the queue, keep unacked ones."""
        if self.cancelled:
            return
        self.cancelled = True
        queue = self.broker.find(self.queue_name)
        if queue is None:
            return
        if self in queue.consumers:
            queue.consumers.remove(self)
        if queue.auto_delete and queue.had_consumer and not queue.consumers:
            self.broker.remove(queue)

    def close_channel(self) -> None:
        """The channel closes: cancel its tasks, requeue what is unacked."""
        self.detach()
        if self.closed:
            return
        self.closed = True
        self.transport.forget(self)  # no longer the connection's
        tasks, self.tasks = self.tasks, {}  # one cancelled before it ran cannot remove itself
        for task in tasks.values():
            task.cancel()
        unacked, self.unacked = self.unacked, {}
        queue = self.broker.find(self.queue_name)
        if queue is None:
            return
        for message in unacked.values():
            message.redelivered = True
            queue.restore(message)
        self.broker.pump(queue)
        self.broker.schedule_expiry(queue)

    def end(self, reason: EndReason, code: int | None, text: str) -> None:
        """Stop receiving without the owner asking, and say so once (``on_end``).

        A cancel by the broker keeps the channel (its deliveries stay settleable); a
        channel or connection end closes it (they are requeued).
        """
        if reason is EndReason.CANCELLED:
            self.detach()
        else:
            self.close_channel()
        if self.asked or self.ended is not None:
            return
        self.ended = ConsumerEnd(self.queue_name, reason, code, text)
        report_end(self.on_end, self.ended)

    async def cancel(self) -> None:
        self.asked = True
        self.detach()

    async def close(self) -> None:
        self.asked = True
        self.close_channel()


async def _carry_on(coro: Coroutine[Any, Any, None], yielded: Any) -> None:
    """Finish, inside a task, a coroutine that already ran up to its first suspension."""
    await _resume(coro, yielded)


@types.coroutine
def _resume(coro: Coroutine[Any, Any, None], yielded: Any) -> Generator[Any, Any, None]:
    # Hands what the coroutine awaits to the task, and the task's answer (a value, or
    # a cancellation thrown in) back to the coroutine, until it returns.
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:  # relayed, never swallowed
            try:
                yielded = coro.throw(exc)
            except StopIteration:
                return
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration:
                return
