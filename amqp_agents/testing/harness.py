"""Run agents on the in-memory broker in a test: worker, RPC client and event bus.

::

    async with AgentHarness(TaskManager(), AuditAgent()) as harness:
        task = await harness.call("task_manager", "task_add", {"title": "x"})
        event = await harness.wait_for_event("task.created")
        await harness.settle()          # every queue drained, nothing in flight

A handler called directly (a plain unit test) can be given the context of a message::

    with AgentHarness.message_context(message_id="m1", attempt=2):
        await TaskManager().add(TaskAdd(title="x"))   # current_context() sees them

Everything is real (queues, priorities, acks, timeouts), only in-process: tests run in
milliseconds and need no broker. Every wait is bounded by ``timeout_s`` and raises
``TimeoutError`` naming what it waited for.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Self

from amqp_agents.events.bus import EventBus
from amqp_agents.models.context import MessageContext, use_context
from amqp_agents.models.messages import AgentResponse, Event, Priority
from amqp_agents.models.topic import topic_matches
from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.worker import Worker
from amqp_agents.transport.memory import InMemoryBroker, InMemoryTransport

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from types import TracebackType

    from amqp_agents.config import WorkerSettings
    from amqp_agents.models.topology import Topology
    from amqp_agents.rpc.client import Payload
    from amqp_agents.runtime.agent import Agent

__all__ = ["AgentHarness"]

_POLL_S = 0.005


class AgentHarness:
    """A worker for ``agents``, a client and a bus, on one :class:`InMemoryBroker`."""

    def __init__(
        self,
        *agents: Agent,
        settings: WorkerSettings | None = None,
        topology: Topology | None = None,
        broker: InMemoryBroker | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        self.broker = broker or InMemoryBroker()
        self.timeout_s = timeout_s
        self._worker_transport = InMemoryTransport(self.broker)
        self._client_transport = InMemoryTransport(self.broker)
        self.worker = Worker(
            self._worker_transport, list(agents), topology=topology, settings=settings
        )
        self.client = RpcClient(self._client_transport, topology=topology)
        self.bus = EventBus(self._client_transport, topology=topology)
        self.events: list[Event] = []
        """Every event published while the harness runs, in arrival order."""
        self._new_event = asyncio.Condition()

    @staticmethod
    def message_context(**fields: Any) -> use_context:
        """A ``with`` block in which handlers called directly see a message context
        built from ``fields`` (as :class:`~amqp_agents.models.context.MessageContext`;
        the rest keep their defaults). Calls they make through an RPC client follow it:
        ``deadline=time.time() + 1`` bounds them, ``priority=7`` is inherited."""
        return use_context(MessageContext(**fields))

    async def __aenter__(self) -> Self:
        await self._worker_transport.connect()
        await self._client_transport.connect()
        await self.bus.start()
        await self.bus.subscribe("#", self._record)
        await self.client.start()
        await self.worker.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.worker.stop()
        await self.client.aclose()
        await self.bus.aclose()
        await self._client_transport.aclose()
        await self._worker_transport.aclose()

    async def _record(self, event: Event) -> None:
        async with self._new_event:
            self.events.append(event)
            self._new_event.notify_all()

    # -- calling -----------------------------------------------------------------------

    async def send(
        self, agent: str, action: str, payload: Payload = None, *, priority: int = Priority.NORMAL
    ) -> AgentResponse:
        """:meth:`RpcClient.send` with the harness's timeout."""
        return await self.client.send(
            agent, action, payload, priority=priority, timeout_s=self.timeout_s
        )

    async def call(
        self, agent: str, action: str, payload: Payload = None, *, priority: int = Priority.NORMAL
    ) -> Any:
        """:meth:`RpcClient.call` (data, or the reply's error raised)."""
        return await self.client.call(
            agent, action, payload, priority=priority, timeout_s=self.timeout_s
        )

    async def publish(self, event_type: str, payload: Any = None) -> str:
        """Publish an event (agents' ``@on_event`` handlers receive it)."""
        return await self.bus.publish(event_type, payload)

    # -- waiting -----------------------------------------------------------------------

    async def wait_for_event(
        self, pattern: str, *, count: int = 1, timeout_s: float | None = None
    ) -> Event:
        """The ``count``-th event matching a topic pattern (already seen ones count)."""
        limit = self.timeout_s if timeout_s is None else timeout_s

        def matching() -> list[Event]:
            return [e for e in self.events if topic_matches(pattern, e.type)]

        try:
            async with asyncio.timeout(limit), self._new_event:
                await self._new_event.wait_for(lambda: len(matching()) >= count)
        except TimeoutError:
            raise TimeoutError(
                f"saw {len(matching())} event(s) matching {pattern!r} in {limit:g}s,"
                f" wanted {count}; events so far: {[e.type for e in self.events]}"
            ) from None
        return matching()[count - 1]

    async def wait_until(
        self,
        condition: Callable[[], bool | Awaitable[bool]],
        *,
        timeout_s: float | None = None,
        what: str = "the condition",
    ) -> None:
        """Poll ``condition()`` (sync or async) until it is true."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(limit):
                while True:
                    result = condition()
                    if not isinstance(result, bool):
                        result = await result
                    if result:
                        return
                    await asyncio.sleep(_POLL_S)
        except TimeoutError:
            raise TimeoutError(f"{what} did not hold within {limit:g}s") from None

    async def settle(self, *, timeout_s: float | None = None) -> None:
        """Wait until no queue holds ready or unacked messages and no handler runs."""

        def quiet() -> bool:
            stats = self.broker.statistics()
            return (
                self.worker.in_flight == 0
                and all(q.messages == 0 for q in stats.queues.values() if not _dead(q.name))
                and not any(stats.unacked.values())
            )

        await self.wait_until(quiet, timeout_s=timeout_s, what="an idle broker")


def _dead(queue: str) -> bool:
    return queue.endswith(".dead")
