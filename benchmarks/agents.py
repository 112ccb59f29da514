"""The agent every "ours" case serves: ``echo`` returns its payload model unchanged."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from pydantic import BaseModel

from amqp_agents import Agent, Topology, Worker, action

if TYPE_CHECKING:
    from amqp_agents.transport.base import Transport

__all__ = ["EchoAgent", "EchoPayload", "declare_agent_queue"]


class EchoPayload(BaseModel):
    """The 200-byte request of the RPC cases (see ``benchmarks.common.echo_payload``)."""

    id: str
    text: str


class EchoAgent(Agent):
    """Answers ``echo`` with its payload; counts what it handled for the drain case.

    When ``expected`` requests have been handled, ``all_handled`` is set and
    ``first_ns``/``last_ns`` hold the ``time.monotonic_ns()`` of the first and last one.
    """

    name = "bench_echo"

    def __init__(self, *, name: str | None = None, expected: int = 0) -> None:
        super().__init__(name=name)
        self.expected = expected
        self.handled = 0
        self.first_ns = 0
        self.last_ns = 0
        self.all_handled = asyncio.Event()

    @action("echo")
    async def echo(self, payload: EchoPayload) -> EchoPayload:
        """Return the payload."""
        if self.expected:
            self._count()
        return payload

    def _count(self) -> None:
        now = time.monotonic_ns()
        if not self.handled:
            self.first_ns = now
        self.handled += 1
        if self.handled == self.expected:
            self.last_ns = now
            self.all_handled.set()


async def declare_agent_queue(transport: Transport, agent: str) -> str:
    """Declare ``agents.<agent>`` (and its dead-letter queue) exactly as a worker does.

    The library has no public call that declares an agent's queue without consuming
    it, so start a :class:`~amqp_agents.Worker` on the still empty queue and stop it.
    """
    worker = Worker(transport, [EchoAgent(name=agent)])
    await worker.start()
    await worker.stop()
    return Topology().agent_queue(agent)
