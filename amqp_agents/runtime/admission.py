"""Admission: which deliveries run, when, and what happens to the ones that cannot.

Every delivery of a worker, request or event, passes :meth:`Admission.guarded` (in its
own task, spawned by the transport): it waits for one of ``concurrency`` slots, runs,
and frees the slot. Around that:

* **giving back**: a delivery that arrives while the worker stops, or still waits for
  a slot when the stop begins, has not started; a request is published again as it
  came and acked (so a rolling restart does not count it as an attempt), anything else
  is requeued (:meth:`Admission.give_back`);
* **the watchdog**: a handler cut off by its time limit that ignores the cancellation
  for ``STUCK_GRACE_S`` is let go: its delivery is requeued (counted, so a request that
  always does this ends in its dead-letter queue), its slot freed, and liveness fails
  while it runs (:meth:`Admission.watch`);
* **the stop**: waiting deliveries are cancelled (and given back), running ones get the
  grace period, then are cancelled (requeued) (:meth:`Admission.drain`).

The worker owns the lifecycle: it sets :attr:`Admission.accepting` when it starts and
clears it when its stop begins; every delivery checks it before it starts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Final

from amqp_agents.bounds import Slots
from amqp_agents.errors import TransportError
from amqp_agents.models.wire import deadline_from
from amqp_agents.runtime.settle import action_label

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from amqp_agents.metrics import Metrics
    from amqp_agents.models.envelope import Envelope
    from amqp_agents.models.topology import Topology
    from amqp_agents.runtime.agent import Agent
    from amqp_agents.runtime.settle import Settlement, WorkerStats
    from amqp_agents.transport.base import Delivery, Transport

__all__ = ["STUCK_GRACE_S", "Admission"]

log = logging.getLogger("amqp_agents.runtime.worker")

STUCK_GRACE_S: Final = 5.0
"""How long a handler cut off by its time limit may take to end before it is let go."""

StuckTries = list[tuple[asyncio.Task[object], "Agent | None"]]
"""Tasks cut off by their limit and still running, with their agent (None: an event)."""


class Admission:
    """The concurrency bound and the bookkeeping of every delivery a worker holds."""

    def __init__(
        self,
        transport: Transport,
        settle: Settlement,
        *,
        topology: Topology,
        agents: list[Agent],
        concurrency: int,
        publish_timeout_s: float,
        stats: WorkerStats,
        metrics: Metrics | None,
    ) -> None:
        self._transport = transport
        self._settle = settle
        self._topology = topology
        self._agent_names = frozenset(agent.name for agent in agents)
        self._agent_queues = frozenset(topology.agent_queue(agent.name) for agent in agents)
        self._slots = Slots(concurrency)
        self._publish_timeout_s = publish_timeout_s
        self._stats = stats
        self._metrics = metrics
        self.accepting = False
        """Whether the worker takes work: set by the worker while it runs (checked again
        after every wait for a slot)."""
        self.started = False
        """Set by the worker once every consumer is attached: before, a consume cut short
        closes its channel, so an unstarted request is requeued, never acked."""
        self._closing_channels = False
        self._waiting: set[asyncio.Task[object]] = set()
        self._running: set[asyncio.Task[object]] = set()
        self._giving_back: set[asyncio.Future[None]] = set()
        self._deliveries: dict[asyncio.Task[object], Delivery] = {}
        """The delivery of each running task (the watchdog settles abandoned ones)."""
        self._abandoned: dict[asyncio.Task[object], str] = {}
        """Handlers that ignored their time limit's cancellation: task -> what it runs."""

    @property
    def in_flight(self) -> int:
        """Deliveries being handled right now."""
        return len(self._running)

    @property
    def stuck_handlers(self) -> list[str]:
        """Handlers that ignored their time limit's cancellation and still run (their
        slots and deliveries were let go; liveness fails while any is left)."""
        return sorted(self._abandoned.values())

    def _still_accepting(self) -> bool:
        """:attr:`accepting` read again after an await (a method, so that type narrowing
        from before the await does not apply)."""
        return self.accepting

    def _track(self, step: int) -> None:
        """One more (or one fewer) delivery in flight, in the stats and the gauge."""
        self._stats.in_flight += step
        if self._metrics is not None:
            self._metrics.in_flight.inc(step)

    async def guarded(
        self, delivery: Delivery, process: Callable[[Delivery], Awaitable[None]]
    ) -> None:
        """Run ``process`` within the concurrency bound, tracked for a graceful stop;
        deliveries that cannot start are given back, cancelled ones requeued."""
        self._stats.received += 1
        if not self.accepting:
            await self.give_back(delivery)
            return
        task = asyncio.current_task()
        assert task is not None  # noqa: S101  # always inside a task
        if not self._slots.try_take():
            self._waiting.add(task)
            try:
                await self._slots.take()
            except asyncio.CancelledError:
                await self.give_back(delivery)
                raise
            finally:
                self._waiting.discard(task)
            if not self._still_accepting():
                # A slot freed while stopping: not started yet, so it goes back.
                self._slots.release()
                await self.give_back(delivery)
                return
        self._running.add(task)
        self._deliveries[task] = delivery
        self._track(+1)
        try:
            await process(delivery)
        except asyncio.CancelledError:
            await self._settle.requeue(delivery)
            raise
        except Exception:
            # A bug of ours, not the handler's (those become replies): never leave the
            # delivery unsettled. Requeued, it comes back redelivered, and redeliveries
            # are counted, so it cannot loop forever.
            log.exception("processing a delivery failed; requeued")
            await self._settle.requeue(delivery)
        finally:
            del self._deliveries[task]
            if not self._abandoned or self._abandoned.pop(task, None) is None:
                # (else: the watchdog let it go, and did this already)
                self._track(-1)
                self._running.discard(task)
                self._slots.release()

    # -- the watchdog ------------------------------------------------------------------

    async def watch(self, stuck: Callable[[float], StuckTries]) -> None:
        """Let go of handlers that ignore cancellation (forever, until cancelled):
        ``stuck(grace_s)`` names the tries cut off more than ``grace_s`` ago that still
        run, action handlers and event handlers alike."""
        while True:
            await asyncio.sleep(STUCK_GRACE_S / 2)
            for task, agent in stuck(STUCK_GRACE_S):
                delivery = self._deliveries.get(task)
                if delivery is not None and task not in self._abandoned:
                    await self._abandon(agent, task, delivery)

    async def _abandon(
        self, agent: Agent | None, task: asyncio.Task[object], delivery: Delivery
    ) -> None:
        envelope = delivery.envelope
        if agent is None:
            what = f"event handler for {envelope.routing_key}"
        else:
            what = f"{agent.name}.{action_label(agent, envelope.type)}"
        self._abandoned[task] = what
        self._running.discard(task)
        self._track(-1)
        self._slots.release()
        log.error(
            "%s ignored its time limit's cancellation for %gs and still runs; its"
            " delivery is requeued and its slot freed (correlation id %s)",
            what,
            STUCK_GRACE_S,
            envelope.correlation_id,
        )
        if agent is None:
            await self._settle.requeue(delivery)
        else:
            await self._settle.requeue_counted(agent, delivery)

    # -- giving back -------------------------------------------------------------------

    async def give_back(self, delivery: Delivery) -> None:
        """Return a request that never started without making it a redelivery.

        A ``nack(requeue)`` marks it ``redelivered``, and every redelivery counts as an
        attempt (it may have crashed a worker): a few rolling restarts would then
        dead-letter a healthy request that only sat in a worker's prefetch. So an
        unstarted request is published again as it came (same attempt, the time left
        as its TTL; confirmed) and then acked; it goes to the back of its priority
        level. An event, a request that was already a redelivery (its count is still
        due), one whose copy is not confirmed, or any while the worker is not fully
        started or already closing its channels (the ack could be lost, and the request
        would be queued twice) is requeued as before.
        """
        envelope = delivery.envelope
        queue = self._queue_of(envelope)
        if queue is None or envelope.redelivered or self._closing_channels or not self.started:
            await self._settle.requeue(delivery)
            return
        # Copy and ack as one unit, shielded: a cancellation between the two would
        # leave the request twice in the queue.
        giving = asyncio.ensure_future(self._publish_back(delivery, queue))
        self._giving_back.add(giving)
        giving.add_done_callback(self._giving_back.discard)
        await asyncio.shield(giving)

    async def _publish_back(self, delivery: Delivery, queue: str) -> None:
        envelope = delivery.envelope
        deadline = deadline_from(envelope)
        left_ms = None if deadline is None else int((deadline - time.time()) * 1000)
        if left_ms is not None and left_ms <= 0:
            self._stats.expired += 1
            await delivery.ack()  # its caller stopped waiting: as the worker would
            return
        copy = dataclasses.replace(
            envelope,
            exchange="",
            routing_key=queue,
            expiration_ms=left_ms if left_ms is not None else envelope.expiration_ms,
            redelivered=False,
        )
        try:
            await self._transport.publish(
                copy, mandatory=True, timeout_s=min(self._publish_timeout_s, 2.0)
            )
        except TransportError:
            await self._settle.requeue(delivery)
            return
        self._stats.requeued += 1
        await delivery.ack()

    def _queue_of(self, envelope: Envelope) -> str | None:
        """The agent queue a request was delivered from; ``None`` for anything else."""
        topology = self._topology
        if envelope.exchange == topology.requests_exchange:
            name = envelope.routing_key
            return topology.agent_queue(name) if name in self._agent_names else None
        if envelope.exchange == "" and envelope.routing_key in self._agent_queues:
            return envelope.routing_key
        return None

    # -- the stop ----------------------------------------------------------------------

    async def drain(self, grace_s: float, grace_cut: asyncio.Event) -> None:
        """Stop: cancel what waits for a slot (given back), wait up to ``grace_s`` (or
        until ``grace_cut``) for what runs, cancel the rest (requeued), then let the
        copies being given back finish (bounded) before the channels close."""
        for task in list(self._waiting):
            task.cancel()
        if self._running:
            finished = asyncio.ensure_future(asyncio.wait(set(self._running)))
            cut = asyncio.ensure_future(grace_cut.wait())
            await asyncio.wait(
                {finished, cut}, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED
            )
            finished.cancel()  # cancels the wait, never the handlers
            cut.cancel()
            pending = {task for task in self._running if not task.done()}
            for task in pending:
                task.cancel()
            if pending:
                log.warning("cancelled %d handler(s) after the grace period", len(pending))
                await asyncio.wait(pending, timeout=5)
        # Copies given back need their channel for the ack: no new ones from here on
        # (later ones are plainly requeued), and the started ones finish first (bounded).
        self._closing_channels = True
        if self._giving_back:
            await asyncio.wait(set(self._giving_back), timeout=5)
