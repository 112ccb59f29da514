"""The RabbitMQ transport, over aio-pika (the only module that imports it).

Two connections: one publishes, one consumes. Under a memory or disk alarm RabbitMQ
blocks publishing connections; keeping consumers apart means acks still flow while
publishes wait (with a bound). aio-pika manages connections and channels; the hot
path (publish, deliver, ack) talks to the underlying aiormq channel directly so that
no per-message wrapper objects are built.

When a connection dies, every consumer is gone and the callbacks registered with
:meth:`RabbitTransport.on_connection_lost` run once (the RPC client fails its pending
calls). Then, unless ``reconnect`` is off, the transport reconnects by itself and the
:meth:`RabbitTransport.on_connection_restored` callbacks re-declare and re-consume
(the RPC client's reply queue, the event bus's subscriptions). A worker's supervisor
turns ``reconnect`` off and rebuilds the whole worker instead.

It is over 1,000 lines because connection and reconnect, topology calls, publishing,
consuming (with end reporting and admission) and error mapping share it; splitting
along those seams, with one error mapper, is issue 19.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import ssl
from collections import deque
from datetime import UTC, datetime
from enum import Enum
from typing import TYPE_CHECKING, Any, Self, TypeVar

import aio_pika
import aiormq
import aiormq.abc
from aiormq import spec

from amqp_agents.config import ConnectionSettings, redact_url
from amqp_agents.errors import (
    AccessRefusedError,
    BrokerUnavailableError,
    LifecycleError,
    PublishRejectedError,
    PublishTimeoutError,
    QueueNotFoundError,
    ResourceLockedError,
    TopologyMismatchError,
    TransportError,
    UnroutableError,
)
from amqp_agents.models.envelope import Envelope, HeaderValue
from amqp_agents.transport import frames
from amqp_agents.transport.base import (
    ConsumerEnd,
    ConsumerHandle,
    DeliveryHandler,
    EndCallback,
    EndReason,
    ExchangeKind,
    QueueInfo,
    QueueSpec,
    blocked_too_long,
    discard_callback,
    not_restored_in_time,
    report_end,
)
from amqp_agents.transport.tls import client_context

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from aio_pika.abc import AbstractChannel, AbstractConnection

__all__ = ["RabbitTransport"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# Failures of the link or the channel, as aiormq and asyncio raise them.
_LINK_ERRORS = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
)
# What ending a consumer, a channel or a connection may raise when the link is going.
_ENDING_ERRORS = (*_LINK_ERRORS, TimeoutError, aiormq.exceptions.AMQPError)


class _State(Enum):
    NEW = "new"
    CONNECTED = "connected"
    CLOSED = "closed"


class _RabbitDelivery:
    """A delivery settled on the aiormq channel it arrived on."""

    __slots__ = ("_consumer", "_settled", "_tag", "envelope")

    def __init__(self, envelope: Envelope, consumer: _RabbitConsumer, tag: int) -> None:
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
                _stray(exc)
                log.debug("dropping %s of tag %d: its connection closed", how, self._tag)
            except _LINK_ERRORS as exc:
                log.debug("dropping %s of tag %d: %s", how, self._tag, exc)
        finally:
            consumer.settled()


_CLOSE_CODES: dict[type[BaseException], int] = {
    aiormq.exceptions.ChannelAccessRefused: 403,
    aiormq.exceptions.ChannelNotFoundEntity: 404,
    aiormq.exceptions.ChannelLockedResource: 405,
    aiormq.exceptions.ChannelPreconditionFailed: 406,
}


def _close_detail(exc: BaseException | None) -> tuple[int | None, str]:
    """The AMQP reply code and text of a channel's close, as far as aiormq kept them."""
    if exc is None:
        return None, "closed"
    for kind, code in _CLOSE_CODES.items():
        if isinstance(exc, kind):
            return code, str(exc.args[0]) if exc.args else str(exc)
    if isinstance(exc, aiormq.exceptions.ChannelClosed) and len(exc.args) == 2:
        code, text = exc.args
        return (code if isinstance(code, int) else None), str(text)
    return None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _RabbitConsumer:
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
            code, text = _close_detail(exc)
            self._end(EndReason.CONNECTION_LOST, None, text)
            return
        code, text = _close_detail(exc)
        self._end(EndReason.CHANNEL_CLOSED, code, text)

    def _end(self, reason: EndReason, code: int | None, text: str) -> None:
        if self._asked or self.ended is not None:
            return
        self.ended = ConsumerEnd(self._queue, reason, code, text)
        report_end(self._on_end, self.ended)

    def _close_in_background(self) -> None:
        if self._closing is None and not self._channel.is_closed:
            self._closing = asyncio.get_running_loop().create_task(_close_channel(self._channel))
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
            _stray(exc)
        except _ENDING_ERRORS:
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
            self._closing = asyncio.get_running_loop().create_task(_close_channel(self._channel))
        await asyncio.shield(self._closing)


async def _channel_on(connection: AbstractConnection, **options: Any) -> AbstractChannel:
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


def _underlay_closed(connection: AbstractConnection) -> bool:
    underlay = _underlay(connection)
    return underlay is None or underlay.is_closed


def _log_close_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("closing a cancelled consumer's channel failed: %r", task.exception())


async def _close_channel(channel: AbstractChannel) -> None:
    await _close_within(channel.close(), _CLOSE_TIMEOUT_S)


_CLOSE_TIMEOUT_S = 5.0
"""The longest a channel or connection close may take; then it is abandoned."""

_MAX_PUBLISH_CHANNELS = 32
"""Publishing channels per connection (one per exchange) before they are shared."""


async def _close_within(closing: Awaitable[None], timeout_s: float) -> None:
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
    if error is not None and not isinstance(error, _ENDING_ERRORS):
        raise error


def _field_table(headers: dict[str, HeaderValue] | None) -> dict[str, Any] | None:
    # pamqp encodes bytearray, not bytes, as a byte array.
    if not headers or not any(isinstance(v, bytes) for v in headers.values()):
        return headers
    return {k: bytearray(v) if isinstance(v, bytes) else v for k, v in headers.items()}


def _to_properties(env: Envelope) -> spec.Basic.Properties:
    return spec.Basic.Properties(
        content_type=env.content_type,
        headers=_field_table(env.headers),
        delivery_mode=2 if env.persistent else 1,
        priority=env.priority,
        correlation_id=env.correlation_id,
        reply_to=env.reply_to,
        expiration=None if env.expiration_ms is None else str(env.expiration_ms),
        message_id=env.message_id,
        timestamp=(None if env.timestamp is None else datetime.fromtimestamp(env.timestamp, UTC)),
        message_type=env.type,
    )


def _to_envelope(message: aiormq.abc.DeliveredMessage) -> Envelope:
    props = message.header.properties
    delivery = message.delivery
    expiration: int | None = None
    if props.expiration:
        with contextlib.suppress(ValueError):
            expiration = int(props.expiration)
    timestamp = props.timestamp
    return Envelope(
        body=message.body,
        exchange=getattr(delivery, "exchange", "") or "",
        routing_key=getattr(delivery, "routing_key", "") or "",
        content_type=props.content_type,
        type=props.message_type,
        message_id=props.message_id,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        priority=props.priority,
        expiration_ms=expiration,
        timestamp=None if timestamp is None else int(timestamp.timestamp()),
        headers=dict(props.headers) if props.headers else None,  # type: ignore[arg-type]
        persistent=props.delivery_mode == 2,
        redelivered=bool(getattr(delivery, "redelivered", False)),
    )


def _cancelling() -> int:
    task = asyncio.current_task()
    return 0 if task is None else task.cancelling()


def _stray(exc: asyncio.CancelledError) -> BrokerUnavailableError:
    """Re-raise a real cancellation; turn a stray one into a link error.

    When a connection dies, aiormq cancels the futures of everything pending on it
    (confirms, RPC frames). That CancelledError reaches callers whose task nobody
    cancelled: passed on, it would end their task silently (a TaskGroup even ignores
    a child that ends cancelled), and a caller would vanish instead of getting an error.
    """
    task = asyncio.current_task()
    if task is None or task.cancelling():
        raise exc
    return BrokerUnavailableError("the broker connection closed during the operation")


def _is_tls(settings: ConnectionSettings) -> bool:
    return settings.url.get_secret_value().lower().startswith("amqps://")


def _underlay(connection: AbstractConnection | None) -> aiormq.abc.AbstractConnection | None:
    return getattr(getattr(connection, "transport", None), "connection", None)


_NEVER_BLOCKED = asyncio.Event()
_NEVER_BLOCKED.set()


def _unblocked_event(connection: AbstractConnection | None) -> asyncio.Event:
    """The event aiormq clears on ``connection.blocked`` and sets on unblock.

    aiormq tracks the state (its writer and ``ready()`` honour it) but exposes no
    flag: read its event once per connection, and treat an aiormq without it as never
    blocked.
    """
    unblocked = getattr(_underlay(connection), "_Connection__connection_unblocked", None)
    return unblocked if isinstance(unblocked, asyncio.Event) else _NEVER_BLOCKED


_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)'.*?received (?:the value )?(?P<new>'[^']*'|none)"
    r".*?current is (?:the value )?(?P<old>'[^']*'|none)"
)


def _difference(reason: str) -> str:
    """What differs, in words, from RabbitMQ's ``inequivalent arg`` text ("" if not that):
    a queue type is named as such (absent means classic)."""
    found = _INEQUIVALENT.search(reason)
    if found is None:
        return ""
    arg, new, old = found["arg"], found["new"].strip("'"), found["old"].strip("'")
    if arg == "x-queue-type":
        return (
            f"it is a {'classic' if old == 'none' else old} queue and this declares a"
            f" {'classic' if new == 'none' else new} queue (Topology.queue_type / queue_types). "
        )
    return f"its {arg} is {old}, this declares {new}. "


def _topology_error(what: str, exc: BaseException) -> TransportError:
    reason = str(exc)
    if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
        return TopologyMismatchError(
            f"{what} already exists on the broker with different arguments: "
            f"{_difference(reason)}({reason}). "
            "Queue and exchange arguments cannot change after declaration: configure the "
            "same values as the existing one (e.g. Topology.max_priority), or migrate by "
            "draining and deleting it (rabbitmqctl delete_queue NAME -p VHOST) or by "
            "switching to a new name."
        )
    if isinstance(exc, aiormq.exceptions.ChannelLockedResource):
        return ResourceLockedError(f"{what} is exclusive to another connection ({reason})")
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
        return AccessRefusedError(f"{what}: the broker refused it ({reason})")
    if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
        return QueueNotFoundError(f"{what} does not exist ({reason})")
    if isinstance(exc, TimeoutError):
        return BrokerUnavailableError(f"{what}: the broker did not answer in time")
    return BrokerUnavailableError(f"{what}: {reason}")


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
        self._settings = settings or ConnectionSettings()
        frames.install()  # one peer's bad property must not kill the connection
        self._ssl_context = ssl_context
        if self._ssl_context is None and _is_tls(self._settings):
            self._ssl_context = client_context(self._settings.tls)
        self._state = _State.NEW
        self._pub_conn: AbstractConnection | None = None
        self._sub_conn: AbstractConnection | None = None
        self._control: AbstractChannel | None = None
        self._probe: AbstractChannel | None = None
        self._publish_channels: dict[tuple[bool, str], AbstractChannel] = {}
        self._publish_underlays: dict[tuple[bool, str], aiormq.abc.AbstractChannel] = {}
        """Publishing channels by (confirm, exchange): see :meth:`_publish_channel`."""
        self._lost_callbacks: list[Callable[[BaseException | None], None]] = []
        self._restored_callbacks: list[Callable[[], Awaitable[None]]] = []
        self._lost_reported = False
        self._usable = asyncio.Event()
        """Set while publishes may flow: connected, and restored after a loss."""
        self._reconnector: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._channel_lock = asyncio.Lock()
        self._blocked_logged = False
        self._pub_unblocked = _NEVER_BLOCKED
        self.reconnects = 0
        """Connections re-established after a loss."""
        self._reconnect_streak = 0
        self._restored_at = float("-inf")

    @property
    def settings(self) -> ConnectionSettings:
        """The connection settings this transport was built with."""
        return self._settings

    @property
    def is_connected(self) -> bool:
        # aio-pika marks a connection closed only when *we* close it; a connection the
        # server (or the network) dropped is known from the close callback alone.
        return (
            self._state is _State.CONNECTED
            and not self._lost_reported
            and self._pub_conn is not None
            and not self._pub_conn.is_closed
            and self._sub_conn is not None
            and not self._sub_conn.is_closed
        )

    @property
    def will_reconnect(self) -> bool:
        """``settings.reconnect``, while not closed by its owner."""
        return self._settings.reconnect and self._state is not _State.CLOSED

    @property
    def is_blocked(self) -> bool:
        """The broker has blocked publishing (a memory or disk alarm)."""
        blocked = self._state is _State.CONNECTED and not self._pub_unblocked.is_set()
        self._note_blocked(blocked)
        return blocked

    def _note_blocked(self, blocked: bool) -> None:
        """Log each change of the blocked state once."""
        if blocked != self._blocked_logged:
            self._blocked_logged = blocked
            if blocked:
                log.warning("the broker blocked publishing (resource alarm: memory or disk)")
            else:
                log.info("the broker unblocked publishing")

    def __repr__(self) -> str:
        url = redact_url(self._settings.url.get_secret_value())
        return f"<RabbitTransport {url} {self._state.value}>"

    # -- lifecycle -------------------------------------------------------------------

    async def connect(self) -> None:
        if self._state is not _State.NEW:
            raise LifecycleError(f"transport is {self._state.value}; connect() runs once")
        self._state = _State.CONNECTED
        try:
            await self._open_both()
        except BaseException:
            await self.aclose()
            raise
        self._usable.set()

    async def _open_both(self) -> None:
        self._sub_conn = await self._open("consume")
        self._pub_conn = await self._open("publish")
        self._pub_unblocked = _unblocked_event(self._pub_conn)
        self._control = await self._sub_conn.channel(publisher_confirms=False)

    async def _open(self, role: str) -> AbstractConnection:
        s = self._settings
        url = s.url.get_secret_value()
        kwargs: dict[str, Any] = {
            "timeout": s.connect_timeout_s,
            "heartbeat": s.heartbeat_s,
            "client_properties": {"connection_name": f"{s.client_name}/{role}"},
        }
        if self._ssl_context is not None:
            kwargs["ssl_context"] = self._ssl_context
        try:
            connection: AbstractConnection = await aio_pika.connect(url, **kwargs)
        except aiormq.exceptions.ProbableAuthenticationError:
            raise AccessRefusedError(
                f"cannot connect to {redact_url(url)}: authentication failed"
            ) from None
        except asyncio.CancelledError as exc:
            raise _stray(exc) from None
        except (TimeoutError, aiormq.exceptions.AMQPError, *_LINK_ERRORS) as exc:
            # Never echo the URL: aiormq's messages can include it with the password.
            name = type(exc).__name__
            tls_error = exc if isinstance(exc, ssl.SSLError) else exc.__cause__
            if isinstance(tls_error, ssl.SSLError):
                raise BrokerUnavailableError(
                    f"cannot connect to {redact_url(url)}: the TLS handshake failed"
                    f" ({tls_error.reason or type(tls_error).__name__}); check tls.ca_file,"
                    " the broker's certificate and its host name"
                ) from None
            if isinstance(exc, aiormq.exceptions.AMQPConnectionError | OSError):
                raise BrokerUnavailableError(
                    f"cannot connect to {redact_url(url)}: {name} (is the broker running"
                    " and reachable?)"
                ) from None
            if isinstance(exc, aiormq.exceptions.AMQPError):
                raise AccessRefusedError(
                    f"cannot connect to {redact_url(url)}: {name} (the broker closed the"
                    " connection: is the vhost missing or not permitted?)"
                ) from None
            raise BrokerUnavailableError(
                f"cannot connect to {redact_url(url)}: no answer in time"
            ) from None
        connection.close_callbacks.add(self._on_close)
        return connection

    def _on_close(self, sender: object, exc: BaseException | None = None) -> None:
        if self._state is _State.CLOSED or self._lost_reported:
            return
        if sender not in (self._pub_conn, self._sub_conn):
            return  # a connection already replaced by a reconnect
        self._lost_reported = True
        self._usable.clear()
        log.warning("broker connection lost: %s", type(exc).__name__ if exc else "closed")
        for callback in list(self._lost_callbacks):
            try:
                callback(exc)
            except Exception:
                log.exception("connection-lost callback failed")
        if self._settings.reconnect and (self._reconnector is None or self._reconnector.done()):
            self._reconnector = asyncio.get_running_loop().create_task(
                self._reconnect(), name="amqp-agents-reconnect"
            )

    def on_connection_lost(
        self, callback: Callable[[BaseException | None], None]
    ) -> Callable[[], None]:
        self._lost_callbacks.append(callback)
        return lambda: discard_callback(self._lost_callbacks, callback)

    def on_connection_restored(self, callback: Callable[[], Awaitable[None]]) -> Callable[[], None]:
        self._restored_callbacks.append(callback)
        return lambda: discard_callback(self._restored_callbacks, callback)

    async def _reconnect(self) -> None:
        """Re-open both connections until it works, then let owners restore their state.

        The backoff carries over from the last reconnect if the link died again soon
        after it (within ``reconnect_max_s``, at least 5 s): a broker that accepts
        connections and then drops them gets slower and slower tries, not a storm.
        """
        s = self._settings
        loop = asyncio.get_running_loop()
        settled_s = max(s.reconnect_max_s, 5.0)
        recent = loop.time() - self._restored_at < settled_s
        failures = self._reconnect_streak if recent else 0
        while self._open_for_use():
            await self._close_connections()  # the survivor too: every consumer restarts
            failures += 1
            ceiling = min(s.reconnect_max_s, s.reconnect_initial_s * 2 ** (failures - 1))
            await asyncio.sleep(random.uniform(0, ceiling))  # noqa: S311  # jitter
            if not self._open_for_use():
                return
            try:
                await self._open_both()
            except (BrokerUnavailableError, AccessRefusedError) as exc:
                log.warning("reconnect attempt %d failed: %s", failures, exc)
                continue
            self._forget_channels()
            self._lost_reported = False
            for callback in list(self._restored_callbacks):
                try:
                    await callback()
                except Exception:
                    log.exception("restoring after a reconnect failed")
                    self._lost_reported = True
                    break
            if self._lost_reported or not self.is_connected:
                self._lost_reported = True
                continue  # lost again while restoring: start over
            self.reconnects += 1
            self._reconnect_streak = failures
            self._restored_at = loop.time()
            log.info("reconnected to the broker after %d attempt(s)", failures)
            self._usable.set()
            return

    def _open_for_use(self) -> bool:
        """Connected once and not closed by its owner (a method: the state changes
        across awaits, which type narrowing would not see)."""
        return self._state is _State.CONNECTED

    def _forget_channels(self) -> None:
        self._probe = None
        self._publish_channels.clear()
        self._publish_underlays.clear()

    async def _close_connections(self) -> None:
        connections = (self._sub_conn, self._pub_conn)
        self._sub_conn = self._pub_conn = self._control = None
        self._forget_channels()
        for connection in connections:
            if connection is not None and not connection.is_closed:
                await _close_within(connection.close(), _CLOSE_TIMEOUT_S)

    async def aclose(self) -> None:
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        self._usable.set()  # wake publishes waiting for a reconnect: they fail at once
        reconnector, self._reconnector = self._reconnector, None
        if reconnector is not None and reconnector is not asyncio.current_task():
            reconnector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reconnector
        await self._close_connections()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _require_connected(self) -> None:
        if self._state is not _State.CONNECTED:
            raise LifecycleError(f"transport is {self._state.value}, not connected")
        if not self.is_connected:
            raise BrokerUnavailableError("the broker connection is lost")

    # -- topology --------------------------------------------------------------------

    async def _control_channel(self) -> AbstractChannel:
        # A failed declare closes its channel (404, 406): open a fresh one on demand.
        self._require_connected()
        async with self._channel_lock:
            if self._control is None or self._control.is_closed:
                assert self._sub_conn is not None  # noqa: S101  # checked above
                self._control = await _channel_on(self._sub_conn, publisher_confirms=False)
            return self._control

    async def _probe_channel(self) -> AbstractChannel:
        # A passive declare of a missing queue closes its channel (404), so probes use a
        # channel of their own, reopened after such a close; never the consumers' ones.
        self._require_connected()
        async with self._channel_lock:
            if self._probe is None or self._probe.is_closed:
                assert self._sub_conn is not None  # noqa: S101  # checked above
                self._probe = await _channel_on(self._sub_conn, publisher_confirms=False)
            return self._probe

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
        mark = _cancelling()
        channel = await (self._probe_channel() if probe else self._control_channel())
        try:
            result = await operation(channel)
        except asyncio.CancelledError as exc:
            self._drop_channel(channel)
            raise _stray(exc) from None
        except (TimeoutError, aiormq.exceptions.AMQPError, *_LINK_ERRORS) as exc:
            if _cancelling() > mark:
                self._drop_channel(channel)
                raise asyncio.CancelledError from None
            raise _topology_error(what, exc) from None
        if _cancelling() > mark:
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

    async def declare_queue(self, spec_: QueueSpec) -> str:
        queue = await self._control_op(
            f"queue {spec_.name!r}",
            lambda channel: channel.declare_queue(
                spec_.name or None,
                durable=spec_.durable,
                exclusive=spec_.exclusive,
                auto_delete=spec_.auto_delete,
                arguments=dict(spec_.arguments) or None,
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

        One channel per exchange (up to :data:`_MAX_PUBLISH_CHANNELS`, then one shared):
        the broker closes a channel for a publish it refuses (404 no such exchange, 403,
        406), and every publish pending on that channel fails with it. Apart, a missing
        dead-letter exchange cannot fail the replies and requests beside it.
        """
        key = (confirm, exchange if len(self._publish_channels) < _MAX_PUBLISH_CHANNELS else "*")
        underlay = self._publish_underlays.get(key)
        if underlay is not None and not underlay.is_closed:
            return underlay
        self._require_connected()
        async with self._channel_lock:
            channel = self._publish_channels.get(key)
            if channel is None or channel.is_closed:
                assert self._pub_conn is not None  # noqa: S101  # checked above
                channel = await _channel_on(
                    self._pub_conn, publisher_confirms=confirm, on_return_raises=confirm
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
        if self._state is not _State.CONNECTED:
            raise LifecycleError(f"transport is {self._state.value}, not connected")
        waiting_for = ""
        try:
            async with asyncio.timeout(timeout_s):
                if not self._usable.is_set():
                    if not self._settings.reconnect:
                        raise BrokerUnavailableError("the broker connection is lost")
                    waiting_for = "link"
                    await self._usable.wait()
                    if self._state is not _State.CONNECTED:
                        raise LifecycleError("transport closed while waiting to reconnect")
                if not self._pub_unblocked.is_set():
                    # Waiting here, not after writing, keeps the outcome certain: a
                    # publish that times out while blocked was never sent.
                    waiting_for = "unblock"
                    self._note_blocked(True)
                    underlay = _underlay(self._pub_conn)
                    if underlay is not None:
                        await underlay.ready()
                waiting_for = ""
                await self._publish_once_more_if_closed(envelope, confirm, mandatory)
        except aiormq.exceptions.PublishError:
            raise UnroutableError(envelope.exchange, envelope.routing_key) from None
        except aiormq.exceptions.DeliveryError as exc:
            raise PublishRejectedError(f"the broker refused the message: {exc.frame}") from None
        except TimeoutError:
            if waiting_for == "link":
                raise not_restored_in_time(timeout_s) from None
            if waiting_for == "unblock":
                raise blocked_too_long(timeout_s) from None
            raise PublishTimeoutError(
                f"no confirm from the broker within {timeout_s:g}s; the message may or may"
                " not have been enqueued"
            ) from None
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise QueueNotFoundError(f"cannot publish (404, no such exchange): {exc}") from None
        except aiormq.exceptions.ChannelAccessRefused as exc:
            raise AccessRefusedError(f"the broker refused the publish (403): {exc}") from None
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise PublishRejectedError(f"the broker refused the message (406): {exc}") from None
        except asyncio.CancelledError as exc:
            raise _stray(exc) from None
        except (aiormq.exceptions.AMQPError, *_LINK_ERRORS) as exc:
            raise BrokerUnavailableError(f"publish failed: {type(exc).__name__}: {exc}") from None

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
        properties = _to_properties(envelope)
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
        self._require_connected()
        assert self._sub_conn is not None  # noqa: S101  # checked above
        mark = _cancelling()
        channel: AbstractChannel | None = None
        # Deliveries can arrive before consume() returns (with the consume-ok, in the
        # same read): they wait for its outcome. Otherwise a handler would do work whose
        # ack dies with the channel of a cancelled consume(), and the message would be
        # handled twice.
        admission = _Admission()
        try:
            channel = await _channel_on(self._sub_conn, publisher_confirms=False)
            underlay = await channel.get_underlay_channel()
            consumer = _RabbitConsumer(queue, channel, on_end, self._link_lost)
            consumer.underlay = underlay
            if not no_ack:
                await underlay.basic_qos(prefetch_count=prefetch, timeout=10)

            if no_ack:

                async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
                    if admission.open or await admission.admitted():
                        await handler(_NoAckDelivery(_to_envelope(message)))

            else:

                async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
                    consumer.delivered()
                    if admission.open or await admission.admitted():
                        tag = getattr(message.delivery, "delivery_tag", 0) or 0
                        await handler(_RabbitDelivery(_to_envelope(message), consumer, tag))
                    else:
                        consumer.settled()  # refused: the abandoned channel requeues it

            ok = await underlay.basic_consume(queue, on_message, no_ack=no_ack, timeout=10)
            consumer.tag = str(ok.consumer_tag)
            underlay.on_consumer_cancel_callbacks.add(consumer.on_cancel_frame)
        except asyncio.CancelledError as exc:
            self._abandon(channel, admission)
            raise _stray(exc) from None
        except (TimeoutError, aiormq.exceptions.AMQPError, *_LINK_ERRORS) as exc:
            self._abandon(channel, admission)
            if _cancelling() > mark:
                raise asyncio.CancelledError from None
            raise _topology_error(f"queue {queue!r}", exc) from None
        if _cancelling() > mark:  # swallowed by aiormq (see _control_op)
            self._abandon(channel, admission)
            raise asyncio.CancelledError
        admission.decide(admit=True)
        return consumer

    def _link_lost(self) -> bool:
        """The consume connection is gone (a channel's close is then the link's)."""
        return (
            self._lost_reported
            or self._state is not _State.CONNECTED
            or self._sub_conn is None
            or self._sub_conn.is_closed
        )

    def _abandon(self, channel: AbstractChannel | None, admission: _Admission) -> None:
        """Close a half-made consumer's channel in the background (its consumer, if the
        broker made one, must not outlive a failed or cancelled ``consume``), and drop
        the deliveries that reached it meanwhile unhandled."""
        admission.decide(admit=False)
        if channel is None or channel.is_closed:
            return
        task = asyncio.get_running_loop().create_task(_close_channel(channel))
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class _Admission:
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


class _NoAckDelivery:
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
