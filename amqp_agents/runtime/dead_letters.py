"""Look at and replay an agent's dead letters (``agents.<agent>.dead``).

Reading a queue without losing it: messages are consumed with a prefetch of the
batch size, then given back (``nack(requeue)``, which restores their positions) when
only looking, or republished to their original exchange and key (confirmed) and only
then acked when replaying. A replay that fails half-way loses nothing: what was not
confirmed stays in the dead-letter queue.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from amqp_agents.errors import ConfigurationError
from amqp_agents.models.rewrites import replay_envelope
from amqp_agents.models.topology import (
    HEADER_ATTEMPT,
    HEADER_DEAD_LETTERED_AT,
    HEADER_ERROR_CODE,
    HEADER_ERROR_MESSAGE,
    Topology,
    check_name,
)

if TYPE_CHECKING:
    from amqp_agents.models.envelope import Envelope
    from amqp_agents.transport.base import ConsumerHandle, Delivery, Transport

__all__ = ["DeadLetter", "DeadLetters"]

_FETCH_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-lettered request, as its headers describe it."""

    message_id: str | None
    action: str | None
    correlation_id: str | None
    error_code: str | None
    error_message: str | None
    attempts: int | None
    dead_lettered_at_ms: int | None
    body: bytes

    @classmethod
    def from_envelope(cls, envelope: Envelope) -> DeadLetter:
        """Read the reason headers the worker wrote."""
        headers = envelope.headers or {}

        def text(key: str) -> str | None:
            value = headers.get(key)
            return (
                value.decode()
                if isinstance(value, bytes)
                else value
                if isinstance(value, str)
                else None
            )

        def number(key: str) -> int | None:
            value = headers.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) else None

        return cls(
            message_id=envelope.message_id,
            action=envelope.type,
            correlation_id=envelope.correlation_id,
            error_code=text(HEADER_ERROR_CODE),
            error_message=text(HEADER_ERROR_MESSAGE),
            attempts=number(HEADER_ATTEMPT),
            dead_lettered_at_ms=number(HEADER_DEAD_LETTERED_AT),
            body=envelope.body,
        )


class DeadLetters:
    """Peek at and replay the dead letters of agents, over a connected transport."""

    def __init__(
        self, transport: Transport, *, topology: Topology | None = None, timeout_s: float = 10.0
    ) -> None:
        self._transport = transport
        self._topology = topology or Topology()
        self._timeout_s = timeout_s

    async def count(self, agent: str) -> int:
        """Dead letters waiting for ``agent``."""
        return (await self._transport.queue_info(self._queue(agent))).messages

    async def peek(self, agent: str, *, limit: int = 20) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters, left in place."""
        consumer, deliveries = await self._fetch(agent, limit)
        try:
            return [DeadLetter.from_envelope(d.envelope) for d in deliveries]
        finally:
            for delivery in deliveries:
                await delivery.nack(requeue=True)
            if consumer is not None:
                await consumer.close()  # after the nacks: same channel, so they land first

    async def replay(self, agent: str, *, limit: int) -> int:
        """Send the oldest ``limit`` dead letters back to work; returns how many went.

        Each is republished to its original exchange and key as a first attempt, and
        removed from the dead-letter queue only once the broker confirmed it.
        """
        consumer, deliveries = await self._fetch(agent, limit)
        replayed = 0
        try:
            for delivery in deliveries:
                await self._transport.publish(
                    replay_envelope(delivery.envelope), mandatory=True, timeout_s=self._timeout_s
                )
                await delivery.ack()
                replayed += 1
        finally:
            for delivery in deliveries[replayed:]:
                await delivery.nack(requeue=True)
            if consumer is not None:
                await consumer.close()
        return replayed

    def _queue(self, agent: str) -> str:
        try:
            check_name("agent", agent)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        return self._topology.agent_dead_letter_queue(agent)

    async def _fetch(self, agent: str, limit: int) -> tuple[ConsumerHandle | None, list[Delivery]]:
        """Up to ``limit`` unsettled deliveries, and the consumer to close once settled."""
        if limit < 1:
            raise ConfigurationError("limit must be at least 1")
        queue = self._queue(agent)
        wanted = min(limit, (await self._transport.queue_info(queue)).messages)
        if wanted == 0:
            return None, []
        got: list[Delivery] = []
        enough = asyncio.Event()

        async def take(delivery: Delivery) -> None:
            if len(got) >= wanted:
                await delivery.nack(requeue=True)
                return
            got.append(delivery)
            if len(got) >= wanted:
                enough.set()

        # A short-lived reader: if its consumer ends (the queue deleted, the link lost),
        # stop waiting and return what came; nothing is re-attached.
        consumer = await self._transport.consume(
            queue, take, prefetch=wanted, on_end=lambda _end: enough.set()
        )
        try:
            async with asyncio.timeout(self._timeout_s):
                await enough.wait()
        except TimeoutError:
            pass  # fewer than counted (another reader took some): return what came
        finally:
            await consumer.cancel()
        return consumer, got
