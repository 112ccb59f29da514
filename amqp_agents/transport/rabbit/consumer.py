"""Consumers and deliveries on RabbitMQ channels, and the channel helpers they share.

Private to :mod:`amqp_agents.transport.rabbit`. A consumer owns a channel of its own (so
prefetch and failures stay per queue), notices every way it can end and reports it once;
a delivery is settled at most once, on the channel it arrived on, or dropped if that
channel died (the broker redelivers). :class:`Admission` holds a consumer's first
deliveries until ``consume()`` has returned.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import aiormq.abc

from amqp_agents.errors import BrokerUnavailableError
from amqp_agents.transport.base import ConsumerEnd, EndReason, report_end
from amqp_agents.transport.rabbit.errors import ENDING_ERRORS, LINK_ERRORS, close_detail, stray

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from aio_pika.abc import AbstractChannel, AbstractConnection

    from amqp_agents.models.envelope import Envelope
    from amqp_agents.transport.base import EndCallback

__all__ = [
    "CLOSE_TIMEOUT_S",
    "Admission",
    "NoAckDelivery",
    "RabbitConsumer",
    "RabbitDelivery",
    "channel_on",
    "close_channel",
    "close_within",
    "underlay_of",
]

log = logging.getLogger("amqp_agents.transport.rabbitmq")


class RabbitDelivery:
    """A delivery settled on the aiormq channel it arrived on."""

    __slots__ = ("_consumer", "_settled", "_tag", "envelope")

    def __init__(self, envelope: Envelope, consumer: RabbitConsumer, tag: int) -> None:
        self.envelope = envelope
        self._consumer = consumer
        self._tag = tag
        self._settled = False

    async def ack(self) -> None:
        await self._settle("ack", requeue=False)

    async def nack(self, *, requeue: bool = True) -> None:
        await self._settle("nack", requeue=requeue)

    async def reject(self) -> None:
        await self._settle("reject", requeue=False)

    async def _settle(self, how: str, *, requeue: bool) -> None:
        # Settling twice, or on a channel that has died, would close the channel with
        # PRECONDITION_FAILED (unknown delivery tag) and requeue every unacked message
        # on it. A dead channel's deliveries are redelivered by the broker anyway.
        if self._settled:
            return
        self._settled = True
        consumer = self._consumer
        channel = consumer.underlay
        try:
            if channel is None or channel.is_closed:
                log.debug("dropping %s of tag %d: its channel is closed", how, self._tag)
                return
            try:
                # wait=False: queue the frame without awaiting the socket drain; the ack
                # needs no answer, and frames on a channel keep their order anyway.
                if how == "ack":
                    await channel.basic_ack(self._tag, wait=False)
                elif how == "nack":
                    await channel.basic_nack(self._tag, requeue=requeue, wait=False)
                else:
                    await channel.basic_reject(self._tag, requeue=False, wait=False)
            except asyncio.CancelledError as exc:
                stray(exc)
                log.debug("dropping %s of tag %d: its connection closed", how, self._tag)
            except LINK_ERRORS as exc:
                log.debug("dropping %s of tag %d: %s", how, self._tag, exc)
        finally:
            consumer.settled()


class RabbitConsumer:
    """A consumer on a channel of its own (so prefetch and failures stay per queue).

    Notices its own end: the broker's ``basic.cancel`` (aiormq's consumer-cancel
    callbacks) and the channel's close (aio-pika's close callbacks), and reports it
    once through ``on_end``. After a broker's cancel the channel stays open for the
    deliveries in flight and is closed once the last is settled.
    """

    __slots__ = (
        "_asked",
        "_channel",
        "_closing",
        "_connection_lost",
        "_on_end",
        "_queue",
        "_unsettled",
        "ended",
        "tag",
        "underlay",
    )

    def __init__(
        self,
        queue: str,
        channel: AbstractChannel,
        on_end: EndCallback | None,
        connection_lost: Callable[[], bool],
    ) -> None:
        self._queue = queue
        self._channel = channel
        self._on_end = on_end
        self._connection_lost = connection_lost
        self.tag: str | None = None
        self.underlay: aiormq.abc.AbstractChannel | None = None
        self._closing: asyncio.Task[None] | None = None
        self._asked = False
        self._unsettled = 0
        self.ended: ConsumerEnd | None = None
        channel.close_callbacks.add(self._on_channel_close)

    @property
    def queue(self) -> str:
        return self._queue

    def delivered(self) -> None:
        self._unsettled += 1

    def settled(self) -> None:
        self._unsettled -= 1
        if self._unsettled <= 0 and self.ended is not None and not self._channel.is_closed:
            self._close_in_background()

    def on_cancel_frame(self, frame: object) -> None:
        """aiormq's consumer-cancel callback: the broker cancelled a consumer."""
        if getattr(frame, "consumer_tag", None) != self.tag or self.tag is None:
            return
        self._end(EndReason.CANCELLED, None, "cancelled by the broker (queue deleted or moved)")
        if self._unsettled <= 0:
            self._close_in_background()

    def _on_channel_close(self, _sender: object, exc: BaseException | None = None) -> None:
        if self._connection_lost() or isinstance(
            exc, aiormq.exceptions.AMQPConnectionError | ConnectionError | OSError
        ):
            code, text = close_detail(exc)
            self._end(EndReason.CONNECTION_LOST, None, text)
            return
        code, text = close_detail(exc)
        self._end(EndReason.CHANNEL_CLOSED, code, text)

    def _end(self, reason: EndReason, code: int | None, text: str) -> None:
        if self._asked or self.ended is not None:
            return
        self.ended = ConsumerEnd(self._queue, reason, code, text)
        report_end(self._on_end, self.ended)

    def _close_in_background(self) -> None:
        if self._closing is None and not self._channel.is_closed:
            self._closing = asyncio.get_running_loop().create_task(close_channel(self._channel))
            self._closing.add_done_callback(_log_close_failure)

    async def cancel(self) -> None:
        self._asked = True
        if self._channel.is_closed or self._closing is not None or self.ended is not None:
            return
        try:
            underlay = await self._channel.get_underlay_channel()
            await underlay.basic_cancel(self.tag or "", timeout=5)
        except asyncio.CancelledError as exc:
            # The link died under the basic.cancel (aiormq cancels what was pending):
            # the consumer is gone with it. Only a real cancellation propagates, or a
            # worker's stop would end cancelled and take its supervisor with it.
            stray(exc)
        except ENDING_ERRORS:
            pass  # the consumer is gone with its channel

    async def close(self) -> None:
        # The close runs in a task of its own, shielded: a caller cancelled halfway
        # must not leave the channel (and its consumer) half-closed, and a second
        # close() waits for the same one (two Channel.Close frames would make the
        # broker close the whole connection).
        self._asked = True
        if self._closing is None:
            if self._channel.is_closed:
                return
            self._closing = asyncio.get_running_loop().create_task(close_channel(self._channel))
        await asyncio.shield(self._closing)


async def channel_on(connection: AbstractConnection, **options: Any) -> AbstractChannel:
    """A new channel; a connection that closed meanwhile is ``BrokerUnavailableError``.

    aiormq raises a bare ``RuntimeError("<Connection ...> closed")`` for a channel asked
    of a connection that has just closed (before its close callbacks reported it):
    mapped here, or it would escape the error tree (and end a caller's task, or a
    consumer's re-attach loop, with an exception nobody handles).
    """
    try:
        channel: AbstractChannel = await connection.channel(**options)
    except RuntimeError:
        if not connection.is_closed and not _underlay_closed(connection):
            raise
        raise BrokerUnavailableError("the broker connection closed") from None
    return channel


def underlay_of(connection: AbstractConnection | None) -> aiormq.abc.AbstractConnection | None:
    """The aiormq connection under an aio-pika one (``None`` before it is open)."""
    return getattr(getattr(connection, "transport", None), "connection", None)


def _underlay_closed(connection: AbstractConnection) -> bool:
    underlay = underlay_of(connection)
    return underlay is None or underlay.is_closed


def _log_close_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("closing a cancelled consumer's channel failed: %r", task.exception())


async def close_channel(channel: AbstractChannel) -> None:
    """Close ``channel`` within :data:`CLOSE_TIMEOUT_S` (see :func:`close_within`)."""
    await close_within(channel.close(), CLOSE_TIMEOUT_S)


CLOSE_TIMEOUT_S = 5.0
"""The longest a channel or connection close may take; then it is abandoned."""


async def close_within(closing: Awaitable[None], timeout_s: float) -> None:
    """Await a close for at most ``timeout_s``, errors of a dying link ignored.

    Not ``wait_for``: on Python 3.11 it waits for the cancelled close to *finish*,
    and a close stuck on a stalled socket may never do so; a worker's stop (and the
    supervisor's reconnect behind it) would hang with it. Past the bound the close
    is cancelled and left to end on its own.
    """
    task = asyncio.ensure_future(closing)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        log.warning("a close did not finish within %gs; abandoned", timeout_s)
        task.cancel()
        return
    if task.cancelled():  # aiormq cancels what was pending on a dying connection
        return
    error = task.exception()
    if error is not None and not isinstance(error, ENDING_ERRORS):
        raise error


class Admission:
    """Holds a new consumer's first deliveries until ``consume()`` has returned.

    Admitted, they run in arrival order (later ones queue behind the held ones); refused
    (consume failed or was cancelled), none runs: the abandoned channel's close makes
    the broker requeue them.
    """

    __slots__ = ("_held", "_verdict", "open")

    def __init__(self) -> None:
        self.open = False
        """Admitted and nothing held: the hot path's only check."""
        self._verdict: bool | None = None
        self._held: deque[asyncio.Future[bool]] = deque()

    async def admitted(self) -> bool:
        """Wait for the verdict, behind the deliveries that arrived earlier."""
        if self._verdict is False:
            return False
        turn: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._held.append(turn)
        if self._verdict and len(self._held) == 1:
            turn.set_result(True)
        try:
            return await turn
        finally:
            self._held.remove(turn)
            self._next()

    def decide(self, *, admit: bool) -> None:
        """Admit or refuse the held deliveries (the first verdict stands)."""
        if self._verdict is not None:
            return
        self._verdict = admit
        if admit:
            self._next()
        else:
            for turn in self._held:
                if not turn.done():
                    turn.set_result(False)

    def _next(self) -> None:
        if self._verdict is None:
            return
        if self._held:
            head = self._held[0]
            if not head.done():
                head.set_result(self._verdict)
        else:
            self.open = self._verdict


class NoAckDelivery:
    """A delivery from a no-ack consumer: already settled by the broker."""

    __slots__ = ("envelope",)

    def __init__(self, envelope: Envelope) -> None:
        self.envelope = envelope

    async def ack(self) -> None:
        return None

    async def nack(self, *, requeue: bool = True) -> None:
        return None

    async def reject(self) -> None:
        return None
