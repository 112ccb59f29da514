"""The transport interface: what the RPC client and the worker need from a broker.

Guarantees every implementation gives (checked by the shared tests):

* **Publish** returns once the broker has taken responsibility for the message
  (publisher confirm) when ``confirm=True``; with ``mandatory=True`` (and a confirm) a
  message that matches no queue raises :class:`~amqp_agents.errors.UnroutableError`
  instead of being dropped. Every publish is bounded by ``timeout_s``. Without a
  confirm nothing is reported: an unroutable message, or one sent to a missing
  exchange, is lost silently (as on RabbitMQ).
* **Consume** delivers messages of one queue to the handler, at most ``prefetch``
  unsettled at a time, in queue order (priority first, FIFO within a priority). The
  handler is called from the event loop and must not block; it should spawn work.
  Each delivery runs in a task of its own, so handlers wait independently and are
  cancelled when their consumer's channel closes. Only once ``consume()`` has returned:
  deliveries that arrive with the consume-ok wait for it, and a ``consume()`` that fails
  or is cancelled handles none. (No-ack handlers may *start* from the loop directly and
  take a task only if they suspend: a reply handler that files its reply and returns
  needs none. They must not rely on ``asyncio.current_task()`` before their first
  ``await``.)
* **Settlement**: a delivery is settled exactly once (``ack``, ``nack`` or ``reject``);
  unsettled deliveries are requeued by the broker when the consumer's channel closes.
  Settling on a channel that has since died is a no-op (the broker redelivers anyway).
* **End of a consumer**: a consumer started with ``on_end`` reports, exactly once and
  from the event loop, every way it can stop receiving without its owner asking: the
  broker cancelled it (``basic.cancel``: its queue was deleted, or the cluster node that
  hosts it went down), its channel was closed by the broker (with the AMQP code and
  text), or the connection was lost. After ``cancel()`` or ``close()`` it reports
  nothing. Deliveries in flight keep their channel: after a broker's cancel the
  channel stays open and their settlements are still valid (the transport closes it
  once the last is settled); after a channel or connection end they are dropped, and
  the broker redelivers. :class:`~amqp_agents.transport.recovery.Recovery` is the one
  owner that acts on these reports.
* **Loss of the connection** cancels every consumer and is reported once to the
  callbacks registered with :meth:`Transport.on_connection_lost`. A transport that
  reconnects by itself then awaits the :meth:`Transport.on_connection_restored`
  callbacks (owners re-declare and re-consume) before publishes flow again; a publish
  made meanwhile waits within its timeout, then raises ``BrokerUnavailableError``.
* **Flow control**: while the broker blocks publishing (a resource alarm),
  :attr:`Transport.is_blocked` is true and publishes wait within their timeout, then
  raise ``PublishTimeoutError`` saying the message was not sent.

Raises (only from :mod:`amqp_agents.errors`): ``BrokerUnavailableError`` (also for
any operation after the connection was lost), ``PublishTimeoutError``,
``PublishRejectedError``, ``UnroutableError``, ``TopologyMismatchError``,
``QueueNotFoundError``, ``ResourceLockedError`` (another connection's exclusive
queue), ``AccessRefusedError``, ``LifecycleError``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from amqp_agents.errors import BrokerUnavailableError, PublishTimeoutError
from amqp_agents.models.topology import QueueSpec

if TYPE_CHECKING:
    from amqp_agents.models.envelope import Envelope

__all__ = [
    "ConnectionCallbacks",
    "ConsumerEnd",
    "ConsumerHandle",
    "Delivery",
    "DeliveryHandler",
    "EndCallback",
    "EndReason",
    "ExchangeKind",
    "QueueInfo",
    "QueueSpec",
    "Transport",
    "blocked_too_long",
    "not_restored_in_time",
    "report_end",
]


log = logging.getLogger(__name__)


def blocked_too_long(timeout_s: float) -> PublishTimeoutError:
    """The error of a publish that waited in vain for the broker's alarm to end."""
    return PublishTimeoutError(
        "the broker blocks publishing (resource alarm: memory or disk) and did not"
        f" unblock within {timeout_s:g}s; the message was not sent"
    )


class ConnectionCallbacks:
    """The connection-lost and connection-restored callbacks of one transport.

    Both transports keep theirs here, so registering, unregistering and running them
    (a failing callback logged, never raised into the transport) is written once.
    """

    __slots__ = ("_lost", "_restored")

    def __init__(self) -> None:
        self._lost: list[Callable[[BaseException | None], None]] = []
        self._restored: list[Callable[[], Awaitable[None]]] = []

    def on_lost(self, callback: Callable[[BaseException | None], None]) -> Callable[[], None]:
        """Register; returns the function that unregisters it (a no-op once gone)."""
        self._lost.append(callback)
        return lambda: _discard(self._lost, callback)

    def on_restored(self, callback: Callable[[], Awaitable[None]]) -> Callable[[], None]:
        """Register; returns the function that unregisters it (a no-op once gone)."""
        self._restored.append(callback)
        return lambda: _discard(self._restored, callback)

    def report_lost(self, reason: BaseException | None) -> None:
        """Run every connection-lost callback once, in registration order."""
        for callback in list(self._lost):
            try:
                callback(reason)
            except Exception:
                log.exception("connection-lost callback failed")

    async def restore(self, *, stop_at_failure: bool) -> bool:
        """Await every connection-restored callback in order; False if one failed (and,
        with ``stop_at_failure``, the rest were not run: the caller starts over)."""
        ok = True
        for callback in list(self._restored):
            try:
                await callback()
            except Exception:
                log.exception("restoring after a reconnect failed")
                ok = False
                if stop_at_failure:
                    break
        return ok


def _discard(callbacks: list[Any], callback: object) -> None:
    if callback in callbacks:
        callbacks.remove(callback)


def not_restored_in_time(timeout_s: float) -> BrokerUnavailableError:
    """The error of a publish that waited in vain for a reconnect."""
    return BrokerUnavailableError(
        f"the broker connection is lost and was not restored within {timeout_s:g}s;"
        " the message was not sent"
    )


class ExchangeKind(StrEnum):
    """AMQP exchange types the library uses."""

    DIRECT = "direct"
    """Routes on exact routing-key equality (agent requests)."""
    TOPIC = "topic"
    """Routes on dotted patterns with ``*`` and ``#`` (events)."""
    FANOUT = "fanout"
    """Routes every message to every bound queue."""


@dataclass(frozen=True, slots=True)
class QueueInfo:
    """What a passive declare tells: messages ready (not unacked) and consumers."""

    name: str
    messages: int
    consumers: int


class Delivery(Protocol):
    """A consumed message and the way to settle it."""

    @property
    def envelope(self) -> Envelope:
        """The message as delivered."""
        ...

    async def ack(self) -> None:
        """Done with it: the broker forgets the message."""
        ...

    async def nack(self, *, requeue: bool = True) -> None:
        """Give it back (``requeue=True``, redelivered with ``redelivered=True``) or drop it."""
        ...

    async def reject(self) -> None:
        """Refuse it without requeue: it goes to the queue's dead-letter exchange, if any."""
        ...


DeliveryHandler = Callable[[Delivery], Awaitable[None]]


class EndReason(StrEnum):
    """Why a consumer stopped receiving without its owner asking (a metric label)."""

    CANCELLED = "cancelled"
    """The broker sent ``basic.cancel``: the queue was deleted, its node went down, or
    (RabbitMQ 4.3 quorum queues) the consumer timed out."""
    CHANNEL_CLOSED = "channel_closed"
    """The broker closed the consumer's channel with an error (e.g. 406 for an unknown
    delivery tag); the code and text say which."""
    CONNECTION_LOST = "connection_lost"
    """The connection died (network, heartbeat, broker restart, ``close_connection``)."""


@dataclass(frozen=True, slots=True)
class ConsumerEnd:
    """How and why a consumer ended: what ``on_end`` receives."""

    queue: str
    reason: EndReason
    code: int | None = None
    """The AMQP reply code of a channel or connection close, when the broker sent one."""
    text: str = ""
    """The broker's reply text, or a description of the failure."""

    def __str__(self) -> str:
        detail = (
            f" ({self.code} {self.text})" if self.code else f" ({self.text})" if self.text else ""
        )
        return f"consumer of {self.queue!r} ended: {self.reason.value}{detail}"


EndCallback = Callable[[ConsumerEnd], None]


def report_end(on_end: EndCallback | None, end: ConsumerEnd) -> None:
    """Hand a consumer's end to its owner; a failing callback is logged, never raised
    into the transport's reader (which would take the connection down with it)."""
    if on_end is None:
        return
    try:
        on_end(end)
    except Exception:
        log.exception("consumer-end callback of %s failed", end.queue)


class ConsumerHandle(Protocol):
    """A running consumer."""

    @property
    def queue(self) -> str:
        """The queue consumed."""
        ...

    @property
    def ended(self) -> ConsumerEnd | None:
        """How it ended without being asked to, once it has (``None`` while it runs,
        and after ``cancel()``/``close()``)."""
        ...

    async def cancel(self) -> None:
        """Stop receiving deliveries (``basic.cancel``). Unsettled ones stay unsettled."""
        ...

    async def close(self) -> None:
        """Cancel and release the consumer's channel; unsettled deliveries are requeued."""
        ...


class Transport(Protocol):
    """A connection to a broker with AMQP 0-9-1 semantics."""

    @property
    def is_connected(self) -> bool:
        """True while the connection is open."""
        ...

    @property
    def is_blocked(self) -> bool:
        """True while the broker blocks publishing (memory or disk alarm)."""
        ...

    @property
    def will_reconnect(self) -> bool:
        """True if, after a lost connection, the transport comes back by itself (and
        awaits the restored callbacks); false if a lost connection stays lost."""
        ...

    @property
    def connected_to(self) -> str | None:
        """Which broker the connection is open to (a URL, password redacted; with
        several broker URLs, the node in use), ``None`` while not connected."""
        ...

    async def connect(self) -> None:
        """Open the connection; raises ``BrokerUnavailableError`` within the timeout."""
        ...

    async def aclose(self) -> None:
        """Close the connection; unsettled deliveries return to their queues. Idempotent."""
        ...

    def on_connection_lost(
        self, callback: Callable[[BaseException | None], None]
    ) -> Callable[[], None]:
        """Call ``callback(reason)`` once when the connection dies (not on ``aclose``).
        Returns a function that removes the callback (owners that close call it, so a
        transport shared by many short-lived clients keeps none of them alive)."""
        ...

    def on_connection_restored(self, callback: Callable[[], Awaitable[None]]) -> Callable[[], None]:
        """Await ``callback()`` after the transport reconnected by itself, before
        publishes resume. A callback that raises makes the transport reconnect again.
        Returns a function that removes the callback."""
        ...

    async def declare_exchange(
        self, name: str, kind: ExchangeKind, *, durable: bool = True
    ) -> None:
        """Declare an exchange (idempotent when the arguments match)."""
        ...

    async def declare_queue(self, spec: QueueSpec) -> str:
        """Declare a queue and return its name (the server's, for ``name=""``)."""
        ...

    async def bind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        """Bind a queue to an exchange with a routing key or pattern."""
        ...

    async def unbind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        """Remove a binding (a no-op if it does not exist)."""
        ...

    async def queue_info(self, queue: str) -> QueueInfo:
        """Passive declare: ready messages and consumers; ``QueueNotFoundError`` if absent."""
        ...

    async def delete_queue(self, queue: str) -> int:
        """Delete a queue with its messages (``queue.delete``); return how many ready
        messages went with it (0 if it did not exist). Its consumers are cancelled, as
        the broker cancels them: they report :attr:`EndReason.CANCELLED`."""
        ...

    async def publish(
        self,
        envelope: Envelope,
        *,
        mandatory: bool = False,
        confirm: bool = True,
        timeout_s: float,
    ) -> None:
        """Publish to ``envelope.exchange`` with ``envelope.routing_key``."""
        ...

    async def consume(
        self,
        queue: str,
        handler: DeliveryHandler,
        *,
        prefetch: int,
        no_ack: bool = False,
        on_end: EndCallback | None = None,
    ) -> ConsumerHandle:
        """Start consuming ``queue``; with ``no_ack`` deliveries need no settlement.

        ``on_end`` is called once if the consumer ends without being asked to (see the
        module docstring). Every consumer of the library passes one, through
        :class:`~amqp_agents.transport.recovery.Recovery` (a test checks).
        """
        ...
