"""Our server sides: a :class:`~amqp_agents.Worker` hosting :class:`EchoAgent`, and
an :class:`~amqp_agents.events.bus.EventBus` with subscriber groups.

The worker's concurrency (and so its prefetch) is ``--prefetch``, as is the event
bus's prefetch: the same value as the other sides' servers get (100 for RPC, 1000
for events).
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import SecretStr

from amqp_agents import (
    ConnectionSettings,
    EventBus,
    RabbitTransport,
    Topology,
    Worker,
    WorkerSettings,
)
from benchmarks.agents import EchoAgent
from benchmarks.common import EVENT_BINDING, DeliveryLog, group_queue
from benchmarks.proc import ServerMain, emit, ready, stdin_closed

__all__ = ["SERVERS"]


def _worker(args: argparse.Namespace, agent: EchoAgent) -> tuple[RabbitTransport, Worker]:
    transport = RabbitTransport(ConnectionSettings(url=SecretStr(args.url)))
    worker = Worker(transport, [agent], settings=WorkerSettings(concurrency=args.prefetch))
    return transport, worker


async def echo(args: argparse.Namespace) -> None:
    """Answer ``echo`` requests on ``agents.<name>`` until stdin closes."""
    transport, worker = _worker(args, EchoAgent(name=args.name))
    async with transport:
        await worker.start()
        try:
            ready()
            await stdin_closed()
        finally:
            await worker.stop()


async def drain(args: argparse.Namespace) -> None:
    """Consume a pre-filled ``agents.<name>``; report once ``--n`` requests were handled."""
    agent = EchoAgent(name=args.name, expected=args.n)
    transport, worker = _worker(args, agent)
    async with transport:
        await worker.start()
        try:
            ready()
            await agent.all_handled.wait()
            emit("done", count=agent.handled, first_ns=agent.first_ns, last_ns=agent.last_ns)
            await stdin_closed()
        finally:
            await worker.stop()


async def events(args: argparse.Namespace) -> None:
    """``--groups`` subscriber groups on events exchange ``--name``; reports like raw's."""
    transport = RabbitTransport(ConnectionSettings(url=SecretStr(args.url)))
    async with transport:
        bus = EventBus(
            transport, topology=Topology(events_exchange=args.name), prefetch=args.prefetch
        )
        await bus.start()
        deliveries = DeliveryLog(args.groups, args.n, args.probes)

        def handler(group: int) -> Callable[[dict[str, Any]], Awaitable[None]]:
            async def on_event(payload: dict[str, Any]) -> None:
                deliveries.record(group, payload)

            return on_event

        try:
            for group in range(args.groups):
                await bus.subscribe(
                    EVENT_BINDING, handler(group), group=group_queue(args.name, group)
                )
            ready()
            await deliveries.report()
            await stdin_closed()
        finally:
            await bus.aclose()


SERVERS: dict[str, ServerMain] = {"ours-echo": echo, "ours-drain": drain, "ours-events": events}
