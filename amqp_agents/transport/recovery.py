"""The one owner of consumer recovery: every long-lived consumer of the library.

A consumer can end in three ways the owner did not ask for, and all three are healed
the same way, here and nowhere else::

    broker cancels it (queue deleted, its node down)  --.
    broker closes its channel (406, 403, ...)          --+--> on_end --> REATTACHING
    the connection is lost                              --'      (metric, log line,
                                                                  readiness 503)
    REATTACHING --> declare() --> consume(on_end) --> ATTACHED
                    (queue with its arguments, dead-letter queue, bindings)

* **Cancelled or channel closed**: re-attached at once, then with exponential
  backoff and full jitter while the broker refuses (404 "home node down" on a
  cluster, 405 an exclusive queue still locked, a lost link). A topology mismatch
  (406 on declare) is logged as an error on every try and keeps the consumer
  not-ready; it is never a crash loop.
* **Connection lost**: the transport reconnects by itself and awaits
  :meth:`Recovery.restore` (registered as its restored callback) before publishes flow
  again, so a client's reply queue is back before its next call goes out. A transport
  that will not come back (``will_reconnect`` false) escalates at once.
* **Escalation**: a consumer still re-attaching after ``escalate_after_s`` makes
  :attr:`Recovery.stuck` true (liveness fails, so Kubernetes restarts a process that
  cannot heal) and calls ``on_escalate`` once (a worker's supervisor then starts over
  on a new connection).

Probes read :meth:`Recovery.gone` and :attr:`Recovery.stuck`, the state this module
keeps, never a flag of their own. The in-flight deliveries of an ended consumer are
settled as the transport allows (see :mod:`amqp_agents.transport.base`).

It is about 480 lines because an attachment's state machine and the registry that
watches the link, escalates and feeds the probes are one design; they are kept
together so that every recovery path reads in one place.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import TYPE_CHECKING

from amqp_agents.errors import (
    AccessRefusedError,
    AmqpAgentsError,
    BrokerUnavailableError,
    LifecycleError,
    TopologyMismatchError,
)
from amqp_agents.transport.base import ConsumerEnd, EndReason

if TYPE_CHECKING:
    from amqp_agents.metrics import Metrics
    from amqp_agents.transport.base import ConsumerHandle, DeliveryHandler, Transport

__all__ = ["Attachment", "AttachmentState", "Declare", "Recovery"]

log = logging.getLogger(__name__)

Declare = Callable[[], Awaitable[str]]
"""Declares a consumer's queue and everything it needs (arguments, dead-letter queue,
bindings); returns the queue's name (a new one for a server-named queue)."""


class AttachmentState(StrEnum):
    """Where a recovered consumer stands."""

    ATTACHED = "attached"
    """Consuming."""
    REATTACHING = "reattaching"
    """Ended without being asked to; being re-attached."""
    STOPPED = "stopped"
    """Cancelled or closed by its owner: never re-attached."""


class Attachment:
    """One long-lived consumer: its queue, its current handle, and its state."""

    def __init__(
        self,
        recovery: Recovery,
        declare: Declare,
        handler: DeliveryHandler,
        *,
        prefetch: int,
        no_ack: bool,
        label: str,
        on_end: Callable[[ConsumerEnd], None] | None,
    ) -> None:
        self._recovery = recovery
        self.on_end = on_end
        """The owner's hook, called when the consumer ends (before re-attaching)."""
        self._declare = declare
        self._handler = handler
        self._prefetch = prefetch
        self._no_ack = no_ack
        self.label = label
        """The bounded name used in metrics (server-named queues have no stable name)."""
        self.queue = ""
        """The queue consumed now (a server-named queue gets a new name on re-attach)."""
        self.state = AttachmentState.REATTACHING
        self.end: ConsumerEnd | None = None
        """Why it last ended (kept after it is back, for logs)."""
        self.since = time.monotonic()
        """When the current state began (monotonic)."""
        self.last_error: str | None = None
        """The last re-attach failure, while re-attaching."""
        self.attached = asyncio.Event()
        """Set while consuming."""
        self.handle: ConsumerHandle | None = None
        self._retired: list[ConsumerHandle] = []
        self._lock = asyncio.Lock()
        self._generation = 0
        self._task: asyncio.Task[None] | None = None
        self._escalated = False

    def __repr__(self) -> str:
        return f"<Attachment {self.label} {self.state.value}>"

    def describe(self, now: float) -> str:
        """One line for a probe's body: which queue, since when, why, last error."""
        end = self.end
        why = "starting" if end is None else end.reason.value
        if end is not None and end.code:
            why += f" {end.code}"
        error = f"; last try: {self.last_error}" if self.last_error else ""
        return f"consumer of {self.label} gone for {now - self.since:.1f}s ({why}{error})"

    def is_in(self, state: AttachmentState) -> bool:
        """The current state (a method: it changes across awaits)."""
        return self.state is state

    async def attach(self) -> None:
        """Declare and consume once; raises what the transport raised."""
        async with self._lock:
            if self.state is not AttachmentState.REATTACHING:
                return
            transport = self._recovery.transport
            queue = await self._declare()
            self._generation += 1
            generation = self._generation
            handle = await transport.consume(
                queue,
                self._handler,
                prefetch=self._prefetch,
                no_ack=self._no_ack,
                on_end=lambda end: self._on_end(generation, end),
            )
            if self.is_in(AttachmentState.STOPPED):  # stopped meanwhile
                await handle.close()
                return
            self.queue = queue
            self.handle = handle
            self._set(AttachmentState.ATTACHED)
            self.last_error = None
            self._escalated = False
            self.attached.set()
            if handle.ended is not None:  # ended before consume() returned
                self._recovery.ended(self, handle.ended)

    def _on_end(self, generation: int, end: ConsumerEnd) -> None:
        if generation != self._generation or self.handle is None:
            return  # an old handle's late report, or consume() has not returned yet
        self._recovery.ended(self, end)

    def mark_ended(self, end: ConsumerEnd) -> None:
        """Record an end (from ``on_end`` or a lost connection); idempotent."""
        if self.state is not AttachmentState.ATTACHED:
            return
        self.end = end
        if self.handle is not None and end.reason is EndReason.CANCELLED:
            # After a broker's cancel the channel stays open for the deliveries in
            # flight: closed with the attachment if the transport has not done so.
            # (A channel or connection end leaves nothing to close.)
            self._retired.append(self.handle)
        self.handle = None
        self.attached.clear()
        self._set(AttachmentState.REATTACHING)

    def _set(self, state: AttachmentState) -> None:
        self.state = state
        self.since = time.monotonic()
        self._recovery.changed(self)

    def start_retrying(self) -> None:
        """Re-attach in the background until attached or stopped."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._retry(), name=f"amqp-agents-reattach-{self.label}"
            )

    async def _retry(self) -> None:
        recovery = self._recovery
        failures = 0
        while self.state is AttachmentState.REATTACHING:
            if not recovery.transport.is_connected:
                await recovery.link_back()
                continue
            if failures:
                await asyncio.sleep(recovery.backoff(failures))
                if not self.is_in(AttachmentState.REATTACHING):
                    return
            try:
                await self.attach()
            except (AccessRefusedError, TopologyMismatchError) as exc:
                failures += 1
                self.last_error = str(exc)
                log.error("cannot re-attach a consumer to %s: %s", self.label, exc)
            except (AmqpAgentsError, TimeoutError) as exc:
                failures += 1
                self.last_error = str(exc)
                log.warning(
                    "re-attaching a consumer to %s failed (try %d): %s", self.label, failures, exc
                )
            except Exception as exc:  # a bug below: never end the loop silently over it
                failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("re-attaching a consumer to %s failed unexpectedly", self.label)
            else:
                if self.is_in(AttachmentState.ATTACHED):
                    recovery.log_back(self)
                return
            recovery.check_escalation(self)

    def overdue(self, now: float, bound_s: float) -> bool:
        """Re-attaching for longer than ``bound_s``."""
        return self.state is AttachmentState.REATTACHING and now - self.since > bound_s

    def escalate_once(self) -> bool:
        """True the first time it is called for this outage."""
        if self._escalated:
            return False
        self._escalated = True
        return True

    async def cancel(self) -> None:
        """Stop receiving (step 1 of a graceful stop); it is not re-attached again.
        Deliveries in flight keep their channel until :meth:`close`."""
        self._set(AttachmentState.STOPPED)
        self.attached.clear()
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.wait({task}, timeout=5)
        if self.handle is not None:
            await self.handle.cancel()

    async def close(self) -> None:
        """Cancel, then release the channel(s): unsettled deliveries are requeued."""
        if self.state is not AttachmentState.STOPPED:
            await self.cancel()
        handles = [*self._retired, *([self.handle] if self.handle is not None else [])]
        self._retired.clear()
        for handle in handles:
            await handle.close()


class Recovery:
    """Owns the long-lived consumers of one transport and brings each back when it ends.

    Build one per owner group (a worker shares its own with its event bus; a client
    has its own) and pass it down; nothing here is global.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        metrics: Metrics | None = None,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        escalate_after_s: float = 30.0,
        on_escalate: Callable[[str], None] | None = None,
    ) -> None:
        self.transport = transport
        self._metrics = metrics
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._escalate_after_s = escalate_after_s
        self._on_escalate = on_escalate
        self._attachments: list[Attachment] = []
        self._ended_at: dict[Attachment, float] = {}
        self._link = asyncio.Event()
        self._link.set()
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._watchers: list[Callable[[Attachment], None]] = []
        self.cancels = 0
        """Consumers that ended without being asked to (all reasons)."""
        self._unregister = (
            transport.on_connection_lost(self._on_connection_lost),
            transport.on_connection_restored(self.restore),
        )

    @property
    def attachments(self) -> tuple[Attachment, ...]:
        """Every consumer owned, stopped ones excluded."""
        return tuple(a for a in self._attachments if a.state is not AttachmentState.STOPPED)

    @property
    def all_attached(self) -> bool:
        """Every owned consumer is consuming (readiness)."""
        return all(a.state is AttachmentState.ATTACHED for a in self.attachments)

    def gone(self) -> list[Attachment]:
        """The consumers being re-attached, oldest outage first (the ``/readyz`` body)."""
        return sorted(
            (a for a in self._attachments if a.state is AttachmentState.REATTACHING),
            key=lambda a: a.since,
        )

    @property
    def stuck(self) -> bool:
        """A consumer has been re-attaching for longer than the bound (liveness fails)."""
        now = time.monotonic()
        return any(a.overdue(now, self._escalate_after_s) for a in self._attachments)

    async def attach(
        self,
        declare: Declare,
        handler: DeliveryHandler,
        *,
        prefetch: int,
        no_ack: bool = False,
        label: str,
        on_end: Callable[[ConsumerEnd], None] | None = None,
    ) -> Attachment:
        """Declare and consume a queue that is re-attached whenever it ends.

        ``label`` names it in metrics and logs (bounded: not a server-made name);
        ``on_end`` lets the owner react to an end before the re-attach (the RPC client
        fails the calls whose replies went with a lost reply queue).

        Raises what the first declare or consume raised (nothing is registered then).
        """
        if self._closed:
            raise LifecycleError("consumer recovery is closed")
        attachment = Attachment(
            self, declare, handler, prefetch=prefetch, no_ack=no_ack, label=label, on_end=on_end
        )
        await attachment.attach()
        self._attachments.append(attachment)
        return attachment

    def forget(self, attachment: Attachment) -> None:
        """Drop a stopped attachment from the registry."""
        if attachment in self._attachments:
            self._attachments.remove(attachment)
        self._ended_at.pop(attachment, None)

    def backoff(self, failures: int) -> float:
        """Full jitter: uniform in [0, min(max, initial * 2**(failures-1))]."""
        ceiling = min(self._backoff_max_s, self._backoff_initial_s * 2 ** max(failures - 1, 0))
        return random.uniform(0, ceiling)  # noqa: S311  # jitter, not cryptography

    async def link_back(self) -> None:
        """Wait until the transport has reconnected and :meth:`restore` ran (or this
        recovery closes). A consumer's end can be reported before the transport's own
        connection-lost callback: the wait must not return at once meanwhile."""
        if not self.transport.is_connected and not self._closed:
            self._link.clear()
        await self._link.wait()

    def watch(self, callback: Callable[[Attachment], None]) -> None:
        """Call ``callback(attachment)`` after every state change of a consumer."""
        self._watchers.append(callback)

    def changed(self, attachment: Attachment) -> None:
        """An attachment changed state: mirror it into the metrics, tell the watchers."""
        if self._metrics is not None:
            self._metrics.consumer_attached.labels(attachment.label).set(
                1.0 if attachment.state is AttachmentState.ATTACHED else 0.0
            )
        for callback in self._watchers:
            try:
                callback(attachment)
            except Exception:
                log.exception("recovery watcher failed")

    def ended(self, attachment: Attachment, end: ConsumerEnd) -> None:
        """A consumer ended unasked: count, log, and start re-attaching it."""
        if attachment.state is not AttachmentState.ATTACHED:
            return
        attachment.mark_ended(end)
        self._ended_at[attachment] = time.monotonic()
        self.cancels += 1
        if self._metrics is not None:
            self._metrics.consumer_cancels.labels(attachment.label, end.reason.value).inc()
        log.warning("%s; re-attaching", end if end.queue else f"{attachment.label}: {end}")
        if attachment.on_end is not None:
            try:
                attachment.on_end(end)
            except Exception:
                log.exception("consumer-end hook of %s failed", attachment.label)
        self._arm_escalation()
        if end.reason is EndReason.CONNECTION_LOST:
            if not self.transport.will_reconnect:
                self._escalate(attachment, "the connection is lost and will not come back")
            # Otherwise the transport reconnects and awaits restore(); the background
            # loop below waits for the link meanwhile.
        attachment.start_retrying()

    def _on_connection_lost(self, reason: BaseException | None) -> None:
        self._link.clear()
        text = "connection lost" if reason is None else f"{type(reason).__name__}: {reason}"
        for attachment in list(self._attachments):
            if attachment.state is AttachmentState.ATTACHED:
                self.ended(
                    attachment,
                    ConsumerEnd(attachment.queue, EndReason.CONNECTION_LOST, None, text),
                )

    async def restore(self) -> None:
        """After the transport reconnected: re-attach every consumer before publishes
        resume. One that fails keeps retrying in the background; only a link that died
        again raises (the transport then starts over)."""
        if self._closed:
            return
        for attachment in self.gone():
            try:
                await attachment.attach()
            except (AmqpAgentsError, TimeoutError) as exc:
                if isinstance(exc, BrokerUnavailableError) and not self.transport.is_connected:
                    raise
                attachment.last_error = str(exc)
                log.warning("re-attaching %s after a reconnect failed: %s", attachment.label, exc)
            else:
                self.log_back(attachment)
        self._link.set()

    def log_back(self, attachment: Attachment) -> None:
        """Log a consumer's return with how long it was gone (the recovery time)."""
        ended = self._ended_at.pop(attachment, None)
        gone_s = 0.0 if ended is None else time.monotonic() - ended
        reason = attachment.end.reason.value if attachment.end else "unknown"
        log.info("consumer of %s re-attached after %.3fs (%s)", attachment.label, gone_s, reason)

    def check_escalation(self, attachment: Attachment) -> None:
        """Escalate once if the attachment has been re-attaching for too long."""
        if attachment.overdue(time.monotonic(), self._escalate_after_s):
            self._escalate(
                attachment,
                f"not re-attached within {self._escalate_after_s:g}s"
                f" ({attachment.last_error or 'no answer'})",
            )

    def _arm_escalation(self) -> None:
        # A timer, so that an attachment waiting for the link (no tries) escalates too.
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(
                self._escalate_after_s + 0.01, self._on_timer
            )

    def _on_timer(self) -> None:
        self._timer = None
        for attachment in self.gone():
            self.check_escalation(attachment)
        if self.gone():
            self._arm_escalation()

    def _escalate(self, attachment: Attachment, why: str) -> None:
        if not attachment.escalate_once():
            return
        log.error("consumer of %s cannot heal: %s; escalating", attachment.label, why)
        if self._on_escalate is not None:
            self._on_escalate(f"consumer of {attachment.label}: {why}")

    async def aclose(self) -> None:
        """Close every consumer (requeueing what is unsettled) and leave the
        transport's callbacks. Idempotent."""
        self._closed = True
        for unregister in self._unregister:
            unregister()
        self._link.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for attachment in list(self._attachments):
            await attachment.close()
        self._attachments.clear()
