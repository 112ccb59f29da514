"""The worker: hosts agents, consumes their queues, answers requests.

Per request (at-least-once)::

    delivery -> wait for a slot (bounded concurrency) -> decode -> agent.handle()
             -> publish the reply (confirmed) -> ack

The ack comes only after the reply is confirmed, so a crash in between redelivers
the request rather than losing its answer. A malformed request is answered
``INVALID_PAYLOAD`` (when it has ``reply_to``) and acked: it never loops. A request
whose caller's deadline has passed is acked unanswered and counted, not worked on.
What each outcome publishes, and what happens when the broker refuses that, is the
settlement table of :mod:`~amqp_agents.runtime.settle`; the pipeline itself is
:mod:`~amqp_agents.runtime.pipeline`, admission (slots, the handler watchdog, giving
back) :mod:`~amqp_agents.runtime.admission`. This module owns the lifecycle.

Agents that call other agents (``calls_agents = True``) get the worker's
:class:`~amqp_agents.rpc.client.RpcClient` as ``agent.rpc``: one reply queue per
worker, a :class:`~amqp_agents.transport.recovery.Recovery` attachment like the others,
made only when a hosted agent asks for it.

Event handlers of the agents (``@on_event``) run on the worker's
:class:`~amqp_agents.events.bus.EventBus` under the same concurrency bound, timeout and
shutdown as requests.

Every queue the worker consumes (agents', event groups', replies) is a
:class:`~amqp_agents.transport.recovery.Recovery` attachment shared with its event
bus: a consumer that ends (queue deleted, channel closed by the broker, connection
lost and restored by the transport) is re-declared and re-consumed in place, and
readiness is false until every one is back. One that cannot heal within
``reattach_limit_s`` fails liveness and ends :meth:`Worker.serve` with
``BrokerUnavailableError``, so a supervisor starts over on a new connection.

Shutdown order, enforced by :meth:`Worker.stop`:

1. stop taking work: cancel every consumer, requests and events (new messages stay queued);
2. give back deliveries that have not started (waiting for a slot): requests are
   published again as they came and acked, so they are not counted as attempts;
3. wait up to ``grace_period_s`` for in-flight handlers, which reply and ack;
4. cancel the ones still running: their deliveries are requeued, not answered;
5. shut the agents down, then close their RPC client and the event bus (a shutdown
   hook may still call or emit). The transport belongs to the caller, who closes it last.

It is about 500 lines, a third of them docstrings, because readiness and liveness are
read from the same lifecycle state they describe (kept beside it on purpose); the work
per delivery lives in :mod:`~amqp_agents.runtime.admission` and
:mod:`~amqp_agents.runtime.pipeline`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from enum import Enum
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from amqp_agents.config import WorkerSettings
from amqp_agents.errors import (
    BrokerUnavailableError,
    ConfigurationError,
    LifecycleError,
    TransportError,
)
from amqp_agents.events.bus import EventBus
from amqp_agents.models.topology import Topology
from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.admission import Admission, StuckTries
from amqp_agents.runtime.monitor import QueueMonitor
from amqp_agents.runtime.pipeline import RequestPipeline
from amqp_agents.runtime.settle import Settlement, WorkerStats
from amqp_agents.transport.base import (
    Delivery,
    ExchangeKind,
    Transport,
)
from amqp_agents.transport.recovery import Attachment, Recovery

if TYPE_CHECKING:
    from amqp_agents.metrics import Metrics
    from amqp_agents.runtime.agent import Agent
    from amqp_agents.tracing import Tracing

__all__ = ["Worker", "WorkerStats"]

log = logging.getLogger(__name__)

_SHUTDOWN_HOOKS_S = 10.0
"""The longest the agents' ``shutdown()`` hooks may take together during a stop."""

ShutdownTrigger = Callable[[], Awaitable[object]]


class _State(Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Worker:
    """Runs agents on a transport until stopped.

    Use :meth:`serve` in a process (it returns after a graceful stop), or
    :meth:`start` / :meth:`stop` when embedding. The transport must be connected and
    is not closed by the worker.
    """

    def __init__(
        self,
        transport: Transport,
        agents: Sequence[Agent],
        *,
        topology: Topology | None = None,
        settings: WorkerSettings | None = None,
        publish_timeout_s: float = 10.0,
        max_message_bytes: int = 1024 * 1024,
        metrics: Metrics | None = None,
        depth_interval_s: float = 5.0,
        tracing: Tracing | None = None,
    ) -> None:
        untraced = transport
        if tracing is not None:  # tracing: everything below uses the traced transport
            transport = tracing.wrap(transport)
        if not agents:
            raise ConfigurationError("a worker needs at least one agent")
        names = [agent.name for agent in agents]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigurationError(f"agent names must be unique: {', '.join(duplicates)}")
        self._transport = transport
        self._agents = list(agents)
        self._topology = topology or Topology()
        self._settings = settings or WorkerSettings()
        self._recovery = Recovery(
            transport,
            metrics=metrics,
            escalate_after_s=self._settings.reattach_limit_s,
            on_escalate=self._escalate,
        )
        self._escalation = ""
        self._unregister: tuple[Callable[[], None], ...] = ()
        self._consumers: list[Attachment] = []
        self._watchdog: asyncio.Task[None] | None = None
        self._state = _State.NEW
        self._lost = asyncio.Event()
        """Set when consumers cannot heal in place (see ``reattach_limit_s``)."""
        self._stopping: asyncio.Future[None] | None = None
        self._grace_cut = asyncio.Event()
        self._started = False
        self._metrics = metrics
        self._monitor = (
            None
            if metrics is None
            else QueueMonitor(transport, metrics, self.queues, interval_s=depth_interval_s)
        )
        self.stats = WorkerStats()
        self._settle = Settlement(
            transport,
            topology=self._topology,
            settings=self._settings,
            metrics=metrics,
            publish_timeout_s=publish_timeout_s,
            max_message_bytes=max_message_bytes,
            stats=self.stats,
        )
        """The settlement table, carried out (see :mod:`~amqp_agents.runtime.settle`)."""
        self._admission = Admission(
            transport,
            self._settle,
            topology=self._topology,
            agents=self._agents,
            concurrency=self._settings.concurrency,
            publish_timeout_s=publish_timeout_s,
            stats=self.stats,
            metrics=metrics,
        )
        self._pipeline = RequestPipeline(
            self._settle,
            settings=self._settings,
            stats=self.stats,
            metrics=metrics,
            max_message_bytes=max_message_bytes,
        )
        self.events = EventBus(
            transport,
            topology=self._topology,
            publish_timeout_s=publish_timeout_s,
            max_message_bytes=max_message_bytes,
            prefetch=self._settings.concurrency,
            handler_timeout_s=self._settings.action_timeout_s,
            guard=self._admission.guarded,
            metrics=metrics,
            recovery=self._recovery,
        )
        """The worker's event bus: agents emit through it, their handlers run on it."""
        self.rpc: RpcClient | None = None
        """The client of the agents that call other agents (``None`` if none does)."""
        if any(agent.calls_agents for agent in self._agents):
            self.rpc = RpcClient(
                untraced,  # it wraps the transport itself, and makes the call spans
                topology=self._topology,
                publish_timeout_s=publish_timeout_s,
                max_message_bytes=max_message_bytes,
                metrics=metrics,
                recovery=self._recovery,
                tracing=tracing,
            )

    @property
    def agents(self) -> list[Agent]:
        """The hosted agents."""
        return list(self._agents)

    @property
    def is_ready(self) -> bool:
        """Consuming every queue, and the broker takes our publishes (readiness)."""
        return self._consuming() and not self._transport.is_blocked

    @property
    def is_blocked(self) -> bool:
        """The broker blocks publishing (a resource alarm): replies and retries wait."""
        return self._transport.is_blocked

    @property
    def consumers_lost(self) -> bool:
        """Running, yet a consumer has not come back within ``reattach_limit_s``.

        Liveness fails on it so the process gets restarted. A consumer re-attaching
        within the bound does not (readiness does), nor does a blocked connection: it
        is the broker's alarm, and restarting would not clear it.
        """
        return self._started and self._state is _State.RUNNING and self._recovery.stuck

    def liveness_failure(self) -> str | None:
        """Why the process should be restarted (the ``/healthz`` body), or ``None``:
        consumers that did not heal in time, or handlers stuck ignoring cancellation
        (their tasks cannot be killed; only a restart frees them)."""
        if self.consumers_lost:
            return f"consumers did not heal: {self.not_ready_reason() or 'consumers lost'}"
        stuck = self._admission.stuck_handlers
        if stuck:
            return f"{len(stuck)} handler(s) ignore cancellation: {', '.join(stuck[:5])}"
        return None

    @property
    def recovery(self) -> Recovery:
        """The owner of this worker's consumers (what the probes read)."""
        return self._recovery

    def not_ready_reason(self) -> str | None:
        """Why the worker is not ready (the ``/readyz`` body), or ``None`` if it is."""
        if self._state is not _State.RUNNING or not self._started:
            return f"worker is {self._state.value}"
        if not self._transport.is_connected:
            return "the broker connection is lost; reconnecting"
        gone = self._recovery.gone()
        if gone:
            now = time.monotonic()
            return "; ".join(attachment.describe(now) for attachment in gone)
        if self._transport.is_blocked:
            return "the broker blocks publishing (memory or disk alarm)"
        return None

    def _consuming(self) -> bool:
        return (
            self._state is _State.RUNNING
            and self._started
            and self._transport.is_connected
            and self._recovery.all_attached
        )

    @property
    def in_flight(self) -> int:
        """Requests and events being handled right now."""
        return self._admission.in_flight

    @property
    def stuck_handlers(self) -> list[str]:
        """Handlers that ignored their time limit's cancellation and still run (their
        slots and deliveries were let go; liveness fails while any is left)."""
        return self._admission.stuck_handlers

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start the agents, declare their queues and start consuming."""
        if self._state is not _State.NEW:
            raise LifecycleError(f"worker is {self._state.value}; start() runs once")
        self._state = _State.RUNNING
        self._admission.accepting = True
        self._unregister = (
            self._transport.on_connection_lost(self._on_connection_lost),
            self._transport.on_connection_restored(self._on_connection_restored),
        )
        if self._metrics is not None:
            self._metrics.concurrency_limit.set(self._settings.concurrency)
            transport = self._transport
            self._metrics.connection_blocked.set_function(lambda: float(transport.is_blocked))
        try:
            await self.events.start()
            if self.rpc is not None:
                await self.rpc.start()
            for agent in self._agents:
                agent.events = self.events
                if self.rpc is not None and agent.calls_agents:
                    agent.rpc = self.rpc
                try:
                    async with asyncio.timeout(agent.start_timeout_s):
                        await agent.start()
                except TimeoutError:
                    raise LifecycleError(
                        f"agent {agent.name!r} did not start within {agent.start_timeout_s:g}s"
                        " (its start() hangs; raise Agent.start_timeout_s if it is just slow)"
                    ) from None
                consumer = await self._recovery.attach(
                    functools.partial(self._declare_agent_queue, agent),
                    self._handler_for(agent),
                    prefetch=self._settings.concurrency,
                    label=self._topology.agent_queue(agent.name),
                )
                self._consumers.append(consumer)
                log.info("agent %s consuming %s", agent.name, consumer.queue)
                for spec, handler in agent.event_handlers():
                    await self.events.subscribe(spec.pattern, handler, group=spec.group)
                    log.info(
                        "agent %s subscribed to %r (%s)",
                        agent.name,
                        spec.pattern,
                        f"group {spec.group}" if spec.group else "broadcast",
                    )
            self._started = self._admission.started = True
            self._note_broker()
            self._watchdog = asyncio.get_running_loop().create_task(
                self._admission.watch(self._stuck_tries), name="amqp-agents-handler-watchdog"
            )
            if self._monitor is not None:
                self._monitor.start()
        except BaseException:
            await self.stop()
            raise

    def queues(self) -> list[str]:
        """Every queue this worker consumes or feeds: agent, dead-letter, retry, group."""
        topology = self._topology
        names = []
        for agent in self._agents:
            names += [
                topology.agent_queue(agent.name),
                topology.agent_dead_letter_queue(agent.name),
            ]
        names += sorted(self._settle.retry_queues)
        for group in sorted({sub.group for sub in self.events.subscriptions if sub.group}):
            names += [topology.group_queue(group), topology.group_dead_letter_queue(group)]
        return names

    def _on_connection_lost(self, _reason: BaseException | None) -> None:
        if self._metrics is not None:
            self._metrics.connection_losses.inc()

    async def _on_connection_restored(self) -> None:
        # Registered after the recovery's own callback: every consumer is back.
        if self._metrics is not None:
            self._metrics.reconnects.inc()
        log.info(
            "reconnected to the broker (%s); %d consumer(s) attached",
            self._transport.connected_to,
            len(self._consumers),
        )
        self._note_broker()

    def _note_broker(self) -> None:
        """Show which broker node the worker is on: the ``broker_connected`` gauge."""
        where = self._transport.connected_to
        if self._metrics is None or where is None:
            return
        gauge = self._metrics.broker_connected
        gauge.clear()
        gauge.labels(urlsplit(where).netloc.rpartition("@")[2] or where).set(1)

    def _escalate(self, why: str) -> None:
        self._escalation = why
        self._lost.set()

    async def _declare_agent_queue(self, agent: Agent) -> str:
        """Everything an agent's queue needs (again after it was lost): the exchanges,
        its dead-letter queue and binding, the queue with its arguments, its binding."""
        topology = self._topology
        await self._transport.declare_exchange(topology.requests_exchange, ExchangeKind.DIRECT)
        await self._settle.declare_dead_letters(agent)
        queue = await self._transport.declare_queue(topology.agent_queue_spec(agent.name))
        await self._transport.bind_queue(queue, topology.requests_exchange, agent.name)
        return queue

    async def serve(self, shutdown_trigger: ShutdownTrigger | None = None) -> None:
        """Start, run until ``shutdown_trigger()`` returns, then stop gracefully.

        Raises:
            BrokerUnavailableError: a consumer could not be re-attached within
                ``reattach_limit_s`` (or the connection died and the transport does not
                reconnect); the worker has stopped (its unacked deliveries are
                requeued by the broker).
        """
        await self.start()
        trigger = asyncio.ensure_future(shutdown_trigger() if shutdown_trigger else _forever())
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            await asyncio.wait({trigger, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for future in (trigger, lost):
                future.cancel()
            await self._stop_shielded()
        if self._lost.is_set():
            raise BrokerUnavailableError(f"worker stopped: {self._escalation}")

    async def _stop_shielded(self) -> None:
        """Stop even if cancelled meanwhile: a second cancellation (nested timeouts, a
        task group) cuts the grace period short, never the stop itself, so no handler
        is left running with its delivery unsettled."""
        stopping = asyncio.ensure_future(self.stop())
        try:
            await asyncio.shield(stopping)
        except asyncio.CancelledError:
            self._grace_cut.set()
            await asyncio.wait({stopping}, timeout=30)
            raise

    async def stop(self) -> None:
        """Stop gracefully (see the module docstring for the order). Idempotent: a
        second call while stopping waits for the first one to finish."""
        if self._state is _State.STOPPED:
            return
        if self._stopping is not None:
            await asyncio.shield(self._stopping)
            return
        self._stopping = asyncio.get_running_loop().create_future()
        try:
            await self._stop()
        finally:
            self._stopping.set_result(None)

    async def _stop(self) -> None:
        self._state = _State.STOPPING
        self._admission.accepting = False
        if self._monitor is not None:
            await self._monitor.aclose()
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.cancel()
            await asyncio.wait({watchdog}, timeout=5)
        for consumer in self._consumers:
            with contextlib.suppress(TransportError):
                await consumer.cancel()
        await self.events.stop_consuming()
        await self._admission.drain(self._settings.grace_period_s, self._grace_cut)
        for consumer in self._consumers:
            await consumer.close()
        # Bounded: a shutdown hook that hangs must not hold up the stop (and with it a
        # supervisor's fresh start, while liveness stays green).
        hooks = asyncio.ensure_future(
            asyncio.gather(*(agent.shutdown() for agent in self._agents), return_exceptions=True)
        )
        done, _ = await asyncio.wait({hooks}, timeout=_SHUTDOWN_HOOKS_S)
        if not done:
            hooks.cancel()
            log.error("the agents' shutdown hooks did not finish within %gs", _SHUTDOWN_HOOKS_S)
        if self.rpc is not None:
            await self.rpc.aclose()
        await self.events.aclose()
        await self._recovery.aclose()
        for unregister in self._unregister:
            unregister()
        self._consumers.clear()
        self._state = _State.STOPPED

    # -- per delivery ----------------------------------------------------------------

    def _handler_for(self, agent: Agent) -> Callable[[Delivery], Awaitable[None]]:
        process = functools.partial(self._pipeline.process, agent)
        guarded = self._admission.guarded
        metrics = self._metrics
        received = None if metrics is None else metrics.child(metrics.messages_received, agent.name)

        def on_delivery(delivery: Delivery) -> Awaitable[None]:
            # A plain function returning the coroutine: one frame fewer per delivery.
            if received is not None:
                received.inc()
            return guarded(delivery, process)

        return on_delivery

    def _stuck_tries(self, grace_s: float) -> StuckTries:
        """Tries of the agents' actions and event handlers cut off more than ``grace_s``
        ago that still run (what the watchdog lets go)."""
        stuck: StuckTries = [
            (task, agent) for agent in self._agents for task in agent.stuck_tries(grace_s)
        ]
        stuck += [(task, None) for task in self.events.stuck_tries(grace_s)]
        return stuck


async def _forever() -> None:
    await asyncio.Event().wait()
