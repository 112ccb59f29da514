"""The two connections of a RabbitMQ transport and their life: open, lose, reconnect, close.

Private to :mod:`amqp_agents.transport.rabbit`. Two connections, one publishes and one
consumes: under a memory or disk alarm RabbitMQ blocks publishing connections, and
keeping consumers apart means acks still flow while publishes wait (with a bound).

When a connection dies, the ``lost`` callbacks run once (the RPC client fails its
pending calls). Then, with ``reconnect`` on, both connections are re-opened in the
background with exponential backoff and full jitter, the ``restored`` callbacks
re-declare and re-consume, and only then is the link :attr:`usable` again (publishes
flow). A worker's supervisor turns ``reconnect`` off and rebuilds the worker instead.

**Failover**: with several broker URLs (the nodes of a cluster), both connections go to
the first node that answers, trying them in order from the one after the node last
used: a first connect starts with the first URL, a reconnect moves on from the node it
lost (which may be the one that went down). A round in which no node answers is one
failed attempt: the backoff applies between rounds, not between nodes.
:attr:`Link.connected_to` names the node in use (password redacted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from enum import Enum
from typing import TYPE_CHECKING, Any

import aio_pika

from amqp_agents.config import redact_url
from amqp_agents.errors import (
    AccessRefusedError,
    AmqpAgentsError,
    BrokerUnavailableError,
    LifecycleError,
)
from amqp_agents.transport.base import ConnectionCallbacks
from amqp_agents.transport.rabbit.consumer import CLOSE_TIMEOUT_S, close_within, underlay_of
from amqp_agents.transport.rabbit.errors import MAPPED_ERRORS, connect_error, stray

if TYPE_CHECKING:
    import ssl
    from collections.abc import Awaitable, Callable

    from aio_pika.abc import AbstractConnection

    from amqp_agents.config import ConnectionSettings

__all__ = ["Link", "LinkState"]

log = logging.getLogger("amqp_agents.transport.rabbitmq")

_NEVER_BLOCKED = asyncio.Event()
_NEVER_BLOCKED.set()


class LinkState(Enum):
    """Where a link is in its one-way life."""

    NEW = "new"
    CONNECTED = "connected"
    CLOSED = "closed"


def _unblocked_event(connection: AbstractConnection | None) -> asyncio.Event:
    """The event aiormq clears on ``connection.blocked`` and sets on unblock.

    aiormq tracks the state (its writer and ``ready()`` honour it) but exposes no
    flag: read its event once per connection, and treat an aiormq without it as never
    blocked.
    """
    unblocked = getattr(underlay_of(connection), "_Connection__connection_unblocked", None)
    return unblocked if isinstance(unblocked, asyncio.Event) else _NEVER_BLOCKED


class Link:
    """The publish and consume connections, and the reconnect loop that replaces them.

    ``replaced`` is called whenever the connections are closed or replaced, so that the
    owner forgets the channels it opened on them.
    """

    def __init__(
        self,
        settings: ConnectionSettings,
        ssl_context: ssl.SSLContext | None,
        *,
        replaced: Callable[[], None],
    ) -> None:
        self.settings = settings
        self._ssl_context = ssl_context
        self._replaced = replaced
        self.state = LinkState.NEW
        self.publishing: AbstractConnection | None = None
        self.consuming: AbstractConnection | None = None
        self._callbacks = ConnectionCallbacks()
        self.lost_reported = False
        self.usable = asyncio.Event()
        """Set while publishes may flow: connected, and restored after a loss."""
        self._reconnector: asyncio.Task[None] | None = None
        self._blocked_logged = False
        self._unblocked = _NEVER_BLOCKED
        self.reconnects = 0
        """Connections re-established after a loss."""
        self._reconnect_streak = 0
        self._restored_at = float("-inf")
        self._next_url = 0
        """Where the next round of connection attempts starts (see failover)."""
        self.connected_to: str | None = None
        """The broker URL (password redacted) both connections are open to."""

    # -- state -------------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        """Both connections open. aio-pika marks a connection closed only when *we* close
        it; one the server (or the network) dropped is known from the close callback."""
        return (
            self.state is LinkState.CONNECTED
            and not self.lost_reported
            and self.publishing is not None
            and not self.publishing.is_closed
            and self.consuming is not None
            and not self.consuming.is_closed
        )

    @property
    def will_reconnect(self) -> bool:
        """``settings.reconnect``, while not closed by its owner."""
        return self.settings.reconnect and self.state is not LinkState.CLOSED

    @property
    def is_blocked(self) -> bool:
        """The broker has blocked publishing (a memory or disk alarm)."""
        blocked = self.state is LinkState.CONNECTED and not self._unblocked.is_set()
        self._note_blocked(blocked)
        return blocked

    def consuming_lost(self) -> bool:
        """The consume connection is gone (a channel's close is then the link's)."""
        return (
            self.lost_reported
            or self.state is not LinkState.CONNECTED
            or self.consuming is None
            or self.consuming.is_closed
        )

    def open_for_use(self) -> bool:
        """Connected once and not closed by its owner (a method: the state changes
        across awaits, which type narrowing would not see)."""
        return self.state is LinkState.CONNECTED

    def require_connected(self) -> None:
        """Raise unless both connections are up.

        Raises:
            LifecycleError: never connected, or closed by its owner.
            BrokerUnavailableError: the connection is lost (and not restored yet).
        """
        if self.state is not LinkState.CONNECTED:
            raise LifecycleError(f"transport is {self.state.value}, not connected")
        if not self.is_connected:
            raise BrokerUnavailableError("the broker connection is lost")

    def _note_blocked(self, blocked: bool) -> None:
        """Log each change of the blocked state once."""
        if blocked != self._blocked_logged:
            self._blocked_logged = blocked
            if blocked:
                log.warning("the broker blocked publishing (resource alarm: memory or disk)")
            else:
                log.info("the broker unblocked publishing")

    async def ready_to_publish(self) -> None:
        """Wait until a publish may be written: the link restored (if it is down and will
        reconnect) and the broker not blocking publishes. Unbounded: the caller bounds it
        (and asks :meth:`waiting_for` what it was waiting for when time ran out).

        Raises:
            BrokerUnavailableError: the link is down and will not reconnect.
            LifecycleError: closed while waiting.
        """
        if not self.usable.is_set():
            if not self.settings.reconnect:
                raise BrokerUnavailableError("the broker connection is lost")
            await self.usable.wait()
            if self.state is not LinkState.CONNECTED:
                raise LifecycleError("transport closed while waiting to reconnect")
        if not self._unblocked.is_set():
            # Waiting here, not after writing, keeps the outcome certain: a publish that
            # times out while blocked was never sent.
            self._note_blocked(True)
            underlay = underlay_of(self.publishing)
            if underlay is not None:
                await underlay.ready()

    def waiting_for(self) -> str:
        """What a publish that is not yet written waits for: "link", "unblock" or ""."""
        if not self.usable.is_set():
            return "link"
        return "unblock" if not self._unblocked.is_set() else ""

    # -- callbacks ---------------------------------------------------------------------

    def on_connection_lost(
        self, callback: Callable[[BaseException | None], None]
    ) -> Callable[[], None]:
        """Call ``callback`` once per loss; returns the function that unregisters it."""
        return self._callbacks.on_lost(callback)

    def on_connection_restored(self, callback: Callable[[], Awaitable[None]]) -> Callable[[], None]:
        """Await ``callback`` after each reconnect, before publishes flow again."""
        return self._callbacks.on_restored(callback)

    # -- opening and closing -----------------------------------------------------------

    async def connect(self) -> None:
        """Open both connections (once); a failure leaves the link closed.

        Raises:
            LifecycleError: not new.
            BrokerUnavailableError, AccessRefusedError: see :func:`connect_error`.
        """
        if self.state is not LinkState.NEW:
            raise LifecycleError(f"transport is {self.state.value}; connect() runs once")
        self.state = LinkState.CONNECTED
        try:
            await self._open_both()
        except BaseException:
            await self.aclose()
            raise
        self.usable.set()

    async def _open_both(self) -> None:
        """Open both connections on one node: the first that answers (see failover).

        Raises:
            BrokerUnavailableError, AccessRefusedError: no node could be used (with one
                URL, its own error; with several, every node's, in one message).
        """
        urls = self.settings.urls
        failures: list[AmqpAgentsError] = []
        for turn in range(len(urls)):
            index = (self._next_url + turn) % len(urls)
            try:
                consuming, publishing = await self._open_pair(urls[index])
            except (BrokerUnavailableError, AccessRefusedError) as exc:
                if len(urls) == 1:
                    raise
                log.warning("broker %d of %d not usable: %s", index + 1, len(urls), exc)
                failures.append(exc)
                continue
            self.consuming, self.publishing = consuming, publishing
            self._unblocked = _unblocked_event(publishing)
            self._next_url = (index + 1) % len(urls)
            self.connected_to = redact_url(urls[index])
            if len(urls) > 1:
                log.info(
                    "connected to broker %d of %d: %s", index + 1, len(urls), self.connected_to
                )
            return
        kind = (
            AccessRefusedError
            if all(isinstance(exc, AccessRefusedError) for exc in failures)
            else BrokerUnavailableError
        )
        raise kind(
            f"none of the {len(urls)} brokers could be used: "
            + "; ".join(str(exc) for exc in failures)
        )

    async def _open_pair(self, url: str) -> tuple[AbstractConnection, AbstractConnection]:
        """The consume and publish connections to ``url``; neither is left open if the
        other fails."""
        consuming = await self._open(url, "consume")
        try:
            publishing = await self._open(url, "publish")
        except BaseException:
            await close_within(consuming.close(), CLOSE_TIMEOUT_S)
            raise
        return consuming, publishing

    async def _open(self, url: str, role: str) -> AbstractConnection:
        s = self.settings
        kwargs: dict[str, Any] = {
            "timeout": s.connect_timeout_s,
            "heartbeat": s.heartbeat_s,
            "client_properties": {"connection_name": f"{s.client_name}/{role}"},
        }
        if self._ssl_context is not None:
            kwargs["ssl_context"] = self._ssl_context
        try:
            connection: AbstractConnection = await aio_pika.connect(url, **kwargs)
        except asyncio.CancelledError as exc:
            raise stray(exc) from None
        except MAPPED_ERRORS as exc:
            raise connect_error(redact_url(url), exc) from None
        connection.close_callbacks.add(self._on_close)
        return connection

    def _on_close(self, sender: object, exc: BaseException | None = None) -> None:
        if self.state is LinkState.CLOSED or self.lost_reported:
            return
        if sender not in (self.publishing, self.consuming):
            return  # a connection already replaced by a reconnect
        self.lost_reported = True
        self.usable.clear()
        log.warning("broker connection lost: %s", type(exc).__name__ if exc else "closed")
        self._callbacks.report_lost(exc)
        if self.settings.reconnect and (self._reconnector is None or self._reconnector.done()):
            self._reconnector = asyncio.get_running_loop().create_task(
                self._reconnect(), name="amqp-agents-reconnect"
            )

    async def _reconnect(self) -> None:
        """Re-open both connections until it works, then let owners restore their state.

        The backoff carries over from the last reconnect if the link died again soon
        after it (within ``reconnect_max_s``, at least 5 s): a broker that accepts
        connections and then drops them gets slower and slower tries, not a storm.
        """
        s = self.settings
        loop = asyncio.get_running_loop()
        settled_s = max(s.reconnect_max_s, 5.0)
        recent = loop.time() - self._restored_at < settled_s
        failures = self._reconnect_streak if recent else 0
        while self.open_for_use():
            await self._close_connections()  # the survivor too: every consumer restarts
            failures += 1
            ceiling = min(s.reconnect_max_s, s.reconnect_initial_s * 2 ** (failures - 1))
            await asyncio.sleep(random.uniform(0, ceiling))  # noqa: S311  # jitter
            if not self.open_for_use():
                return
            try:
                await self._open_both()
            except (BrokerUnavailableError, AccessRefusedError) as exc:
                log.warning("reconnect attempt %d failed: %s", failures, exc)
                continue
            self._replaced()
            self.lost_reported = False
            if not await self._callbacks.restore(stop_at_failure=True):
                self.lost_reported = True
            if self.lost_reported or not self.is_connected:
                self.lost_reported = True
                continue  # lost again while restoring: start over
            self.reconnects += 1
            self._reconnect_streak = failures
            self._restored_at = loop.time()
            log.info("reconnected to the broker after %d attempt(s)", failures)
            self.usable.set()
            return

    async def _close_connections(self) -> None:
        connections = (self.consuming, self.publishing)
        self.consuming = self.publishing = None
        self.connected_to = None
        self._replaced()
        for connection in connections:
            if connection is not None and not connection.is_closed:
                await close_within(connection.close(), CLOSE_TIMEOUT_S)

    async def aclose(self) -> None:
        """Close for good: stop reconnecting, wake waiting publishes (they fail), close
        both connections within a bound."""
        if self.state is LinkState.CLOSED:
            return
        self.state = LinkState.CLOSED
        self.usable.set()  # wake publishes waiting for a reconnect: they fail at once
        reconnector, self._reconnector = self._reconnector, None
        if reconnector is not None and reconnector is not asyncio.current_task():
            reconnector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reconnector
        await self._close_connections()
