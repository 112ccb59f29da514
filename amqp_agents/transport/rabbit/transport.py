"""``RabbitTransport``: the :class:`~amqp_agents.transport.base.Transport` on RabbitMQ.

It owns the channels: one for topology calls, one for probes (a passive declare of a
missing queue closes its channel), one per exchange for publishing, one per consumer.
The connections are the :class:`~amqp_agents.transport.rabbit.link.Link`'s; what
aiormq raises is mapped by :mod:`amqp_agents.transport.rabbit.errors`. The hot path
(publish, deliver, ack) talks to the underlying aiormq channel directly, so no
per-message wrapper objects are built. It is about 400 lines because the four kinds of
channel share one lock and one reconnect-forget; each operation is a short method.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Self, TypeVar

import aio_pika
import aiormq
import aiormq.abc

from amqp_agents.config import ConnectionSettings, redact_url
from amqp_agents.errors import AmqpAgentsError, LifecycleError
from amqp_agents.transport import frames
from amqp_agents.transport.base import ExchangeKind, QueueInfo
from amqp_agents.transport.rabbit.codec import to_envelope, to_properties
from amqp_agents.transport.rabbit.consumer import (
    Admission,
    NoAckDelivery,
    RabbitConsumer,
    RabbitDelivery,
    channel_on,
    close_channel,
)
from amqp_agents.transport.rabbit.errors import (
    MAPPED_ERRORS,
    cancelling,
    publish_error,
    stray,
    topology_error,
)
from amqp_agents.transport.rabbit.link import Link, LinkState
from amqp_agents.transport.tls import client_context

if TYPE_CHECKING:
    import ssl
    from collections.abc import Awaitable, Callable

    from aio_pika.abc import AbstractChannel

    from amqp_agents.models.envelope import Envelope
    from amqp_agents.models.topology import QueueSpec
    from amqp_agents.transport.base import ConsumerHandle, DeliveryHandler, EndCallback

__all__ = ["RabbitTransport"]

log = logging.getLogger("amqp_agents.transport.rabbitmq")

_T = TypeVar("_T")

MAX_PUBLISH_CHANNELS = 32
"""Publishing channels per connection (one per exchange) before they are shared."""


class RabbitTransport:
    """:class:`~amqp_agents.transport.base.Transport` on a real RabbitMQ broker.

    With ``settings.reconnect`` (the default), a lost connection is re-opened in the
    background with exponential backoff and full jitter; then the callbacks registered
    with :meth:`on_connection_restored` run (owners re-declare their queues and
    re-consume), and only then do publishes flow again. A publish made while the link
    is down waits for it, within its own timeout, then fails clearly.
    """

    def __init__(
        self,
        settings: ConnectionSettings | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        settings = settings or ConnectionSettings()
        frames.install()  # one peer's bad property must not kill the connection
        if ssl_context is None and settings.urls[0].lower().startswith("amqps://"):
            ssl_context = client_context(settings.tls)
        self._link = Link(settings, ssl_context, replaced=self._forget_channels)
        self._control: AbstractChannel | None = None
        self._probe: AbstractChannel | None = None
        self._publish_channels: dict[tuple[bool, str], AbstractChannel] = {}
        self._publish_underlays: dict[tuple[bool, str], aiormq.abc.AbstractChannel] = {}
        """Publishing channels by (confirm, exchange): see :meth:`_publish_channel`."""
        self._background: set[asyncio.Task[None]] = set()
        self._channel_lock = asyncio.Lock()

    @property
    def settings(self) -> ConnectionSettings:
        """The connection settings this transport was built with."""
        return self._link.settings

    @property
    def is_connected(self) -> bool:
        return self._link.is_connected

    @property
    def will_reconnect(self) -> bool:
        """``settings.reconnect``, while not closed by its owner."""
        return self._link.will_reconnect

    @property
    def is_blocked(self) -> bool:
        """The broker has blocked publishing (a memory or disk alarm)."""
        return self._link.is_blocked

    @property
    def connected_to(self) -> str | None:
        """The broker URL in use (password redacted; one of several with failover)."""
        return self._link.connected_to

    @property
    def reconnects(self) -> int:
        """Connections re-established after a loss."""
        return self._link.reconnects

    def __repr__(self) -> str:
        url = redact_url(self._link.settings.url.get_secret_value())
        return f"<RabbitTransport {url} {self._link.state.value}>"

    # -- lifecycle -------------------------------------------------------------------

    async def connect(self) -> None:
        await self._link.connect()

    def on_connection_lost(
        self, callback: Callable[[BaseException | None], None]
    ) -> Callable[[], None]:
        return self._link.on_connection_lost(callback)

    def on_connection_restored(self, callback: Callable[[], Awaitable[None]]) -> Callable[[], None]:
        return self._link.on_connection_restored(callback)

    def _forget_channels(self) -> None:
        self._control = self._probe = None
        self._publish_channels.clear()
        self._publish_underlays.clear()

    async def aclose(self) -> None:
        await self._link.aclose()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- topology --------------------------------------------------------------------

    async def _own_channel(self, which: str) -> AbstractChannel:
        """The control or probe channel, (re)opened on demand: a failed declare (404,
        406) closes its channel, and a probe of a missing queue must not close the
        control channel (nor ever a consumer's)."""
        self._link.require_connected()
        async with self._channel_lock:
            channel = self._control if which == "control" else self._probe
            if channel is None or channel.is_closed:
                assert self._link.consuming is not None  # noqa: S101  # checked above
                channel = await channel_on(self._link.consuming, publisher_confirms=False)
                if which == "control":
                    self._control = channel
                else:
                    self._probe = channel
            return channel

    def _drop_channel(self, channel: AbstractChannel) -> None:
        # aiormq closes a channel whose request was cancelled; it is not is_closed until
        # the broker answers, and reusing it meanwhile fails the next request.
        if self._control is channel:
            self._control = None
        if self._probe is channel:
            self._probe = None

    async def _control_op(
        self,
        what: str,
        operation: Callable[[AbstractChannel], Awaitable[_T]],
        *,
        probe: bool = False,
    ) -> _T:
        """Run one topology request with the error mapping and cancellation rules.

        On Python 3.11 aiormq's ``wait_for`` can swallow a cancellation that arrives
        with the answer (CPython gh-86296): the cancellation is noticed here and raised,
        so a cancelled caller never carries on as if nothing happened.
        """
        mark = cancelling()
        channel = await self._own_channel("probe" if probe else "control")
        try:
            result = await operation(channel)
        except asyncio.CancelledError as exc:
            self._drop_channel(channel)
            raise stray(exc) from None
        except MAPPED_ERRORS as exc:
            # The broker closes the channel of a refused request (404, 406), and aiormq
            # closes one whose request timed out, but neither counts as closed until the
            # close is answered: reusing it meanwhile would fail every later request.
            self._drop_channel(channel)
            if cancelling() > mark:
                raise asyncio.CancelledError from None
            raise topology_error(what, exc) from None
        if cancelling() > mark:
            raise asyncio.CancelledError
        return result

    async def declare_exchange(
        self, name: str, kind: ExchangeKind, *, durable: bool = True
    ) -> None:
        await self._control_op(
            f"exchange {name!r}",
            lambda channel: channel.declare_exchange(
                name, aio_pika.ExchangeType(kind.value), durable=durable, timeout=10
            ),
        )

    async def declare_queue(self, spec: QueueSpec) -> str:
        queue = await self._control_op(
            f"queue {spec.name!r}",
            lambda channel: channel.declare_queue(
                spec.name or None,
                durable=spec.durable,
                exclusive=spec.exclusive,
                auto_delete=spec.auto_delete,
                arguments=dict(spec.arguments) or None,
                timeout=10,
            ),
        )
        return queue.name

    async def bind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        async def bind(channel: AbstractChannel) -> None:
            underlay = await channel.get_underlay_channel()
            await underlay.queue_bind(queue, exchange, routing_key=routing_key, timeout=10)

        await self._control_op(f"binding of {queue!r} to {exchange!r}", bind)

    async def unbind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        async def unbind(channel: AbstractChannel) -> None:
            underlay = await channel.get_underlay_channel()
            await underlay.queue_unbind(queue, exchange, routing_key=routing_key, timeout=10)

        await self._control_op(f"binding of {queue!r} to {exchange!r}", unbind)

    async def queue_info(self, queue: str) -> QueueInfo:
        async def probe(channel: AbstractChannel) -> QueueInfo:
            underlay = await channel.get_underlay_channel()
            ok = await underlay.queue_declare(queue, passive=True, timeout=10)
            return QueueInfo(
                name=queue, messages=ok.message_count or 0, consumers=ok.consumer_count or 0
            )

        return await self._control_op(f"queue {queue!r}", probe, probe=True)

    async def delete_queue(self, queue: str) -> int:
        async def delete(channel: AbstractChannel) -> int:
            underlay = await channel.get_underlay_channel()
            ok = await underlay.queue_delete(queue, timeout=10)
            return ok.message_count or 0

        return await self._control_op(f"queue {queue!r}", delete)

    # -- publishing ------------------------------------------------------------------

    async def _publish_channel(self, confirm: bool, exchange: str) -> aiormq.abc.AbstractChannel:
        """The channel to publish to ``exchange`` on (the hot path: the aiormq channel
        itself, cached while it lives).

        One channel per exchange (up to :data:`MAX_PUBLISH_CHANNELS`, then one shared):
        the broker closes a channel for a publish it refuses (404 no such exchange, 403,
        406), and every publish pending on that channel fails with it. Apart, a missing
        dead-letter exchange cannot fail the replies and requests beside it.
        """
        key = (confirm, exchange if len(self._publish_channels) < MAX_PUBLISH_CHANNELS else "*")
        underlay = self._publish_underlays.get(key)
        if underlay is not None and not underlay.is_closed:
            return underlay
        self._link.require_connected()
        async with self._channel_lock:
            channel = self._publish_channels.get(key)
            if channel is None or channel.is_closed:
                assert self._link.publishing is not None  # noqa: S101  # checked above
                channel = await channel_on(
                    self._link.publishing, publisher_confirms=confirm, on_return_raises=confirm
                )
                self._publish_channels[key] = channel
            underlay = await channel.get_underlay_channel()
            self._publish_underlays[key] = underlay
        return underlay

    async def publish(
        self,
        envelope: Envelope,
        *,
        mandatory: bool = False,
        confirm: bool = True,
        timeout_s: float,
    ) -> None:
        if self._link.state is not LinkState.CONNECTED:
            raise LifecycleError(f"transport is {self._link.state.value}, not connected")
        written = False
        try:
            async with asyncio.timeout(timeout_s):
                await self._link.ready_to_publish()
                written = True
                await self._publish_once_more_if_closed(envelope, confirm, mandatory)
        except asyncio.CancelledError as exc:
            raise stray(exc) from None
        except AmqpAgentsError:
            raise
        except MAPPED_ERRORS as exc:
            waiting_for = "" if written else self._link.waiting_for()
            raise publish_error(
                exc, envelope, waiting_for=waiting_for, timeout_s=timeout_s
            ) from None

    async def _publish_once_more_if_closed(
        self, envelope: Envelope, confirm: bool, mandatory: bool
    ) -> None:
        """Publish on the shared channel; if the broker closed it (403, 404, 406), once
        more on a new one.

        The broker closes a channel for one refused publish, and every publish pending
        on it fails with that error: the refused one and the ones after it, which the
        broker discarded. Sent once more, the others go through (at least once: one
        enqueued before the close may be enqueued twice) and the refused one fails
        again, with its own error. Never more than twice: no loop.
        """
        properties = to_properties(envelope)
        for attempt in (1, 2):
            channel = await self._publish_channel(confirm, envelope.exchange)
            try:
                await channel.basic_publish(
                    envelope.body,
                    exchange=envelope.exchange,
                    routing_key=envelope.routing_key,
                    properties=properties,
                    mandatory=mandatory,
                )
            except (aiormq.exceptions.ChannelClosed, aiormq.exceptions.ChannelInvalidStateError):
                if attempt == 2 or not self.is_connected:
                    raise
                log.debug("publish channel closed by the broker; publishing once more")
            else:
                return

    # -- consuming -------------------------------------------------------------------

    async def consume(
        self,
        queue: str,
        handler: DeliveryHandler,
        *,
        prefetch: int,
        no_ack: bool = False,
        on_end: EndCallback | None = None,
    ) -> ConsumerHandle:
        self._link.require_connected()
        connection = self._link.consuming
        assert connection is not None  # noqa: S101  # checked above
        mark = cancelling()
        channel: AbstractChannel | None = None
        # Deliveries can arrive before consume() returns (with the consume-ok, in the
        # same read): they wait for its outcome. Otherwise a handler would do work whose
        # ack dies with the channel of a cancelled consume(), and the message would be
        # handled twice.
        admission = Admission()
        try:
            channel = await channel_on(connection, publisher_confirms=False)
            underlay = await channel.get_underlay_channel()
            consumer = RabbitConsumer(queue, channel, on_end, self._link.consuming_lost)
            consumer.underlay = underlay
            if not no_ack:
                await underlay.basic_qos(prefetch_count=prefetch, timeout=10)

            if no_ack:

                async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
                    if admission.open or await admission.admitted():
                        await handler(NoAckDelivery(to_envelope(message)))

            else:

                async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
                    consumer.delivered()
                    if admission.open or await admission.admitted():
                        tag = getattr(message.delivery, "delivery_tag", 0) or 0
                        await handler(RabbitDelivery(to_envelope(message), consumer, tag))
                    else:
                        consumer.settled()  # refused: the abandoned channel requeues it

            ok = await underlay.basic_consume(queue, on_message, no_ack=no_ack, timeout=10)
            consumer.tag = str(ok.consumer_tag)
            underlay.on_consumer_cancel_callbacks.add(consumer.on_cancel_frame)
        except asyncio.CancelledError as exc:
            self._abandon(channel, admission)
            raise stray(exc) from None
        except MAPPED_ERRORS as exc:
            self._abandon(channel, admission)
            if cancelling() > mark:
                raise asyncio.CancelledError from None
            raise topology_error(f"queue {queue!r}", exc) from None
        if cancelling() > mark:  # swallowed by aiormq (see _control_op)
            self._abandon(channel, admission)
            raise asyncio.CancelledError
        admission.decide(admit=True)
        return consumer

    def _abandon(self, channel: AbstractChannel | None, admission: Admission) -> None:
        """Close a half-made consumer's channel in the background (its consumer, if the
        broker made one, must not outlive a failed or cancelled ``consume``), and drop
        the deliveries that reached it meanwhile unhandled."""
        admission.decide(admit=False)
        if channel is None or channel.is_closed:
            return
        task = asyncio.get_running_loop().create_task(close_channel(channel))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
