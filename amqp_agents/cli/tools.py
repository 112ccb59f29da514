"""The one-shot and operator commands: call, publish, listen, queues, exporter,
dead-letters, demo and asyncapi. Each connects, does its work, and closes, whatever
happens (asyncapi does not connect at all)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import TYPE_CHECKING

from amqp_agents.cli.parser import package_version
from amqp_agents.cli.plumbing import (
    connected,
    event_bus,
    exit_when_lost,
    json_object,
    load_agents,
    on_stop_signals,
    tracing_from,
)
from amqp_agents.config import Settings, redact_url
from amqp_agents.contract.asyncapi import asyncapi_document, render
from amqp_agents.errors import (
    BrokerUnavailableError,
    ConfigurationError,
    QueueNotFoundError,
)
from amqp_agents.examples.demo import run_demo
from amqp_agents.metrics import CONTENT_TYPE, Metrics
from amqp_agents.models.messages import Event  # noqa: TC001  # handler annotations are read at run time
from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.dead_letters import DeadLetters
from amqp_agents.runtime.health import HealthServer, ProbeResult
from amqp_agents.runtime.monitor import QueueMonitor
from amqp_agents.transport.factory import create_transport, is_memory_url
from amqp_agents.transport.memory import InMemoryBroker

if TYPE_CHECKING:
    import argparse
    from pathlib import Path

    from amqp_agents.events.bus import Process
    from amqp_agents.transport.base import Delivery, Transport

__all__ = [
    "asyncapi",
    "call",
    "dead_letters",
    "demo",
    "exporter",
    "listen",
    "publish",
    "queues",
]

log = logging.getLogger("amqp_agents.cli")


async def asyncapi(args: argparse.Namespace, settings: Settings) -> int:
    document = asyncapi_document(
        load_agents(args.target),
        topology=settings.topology,
        broker_url=settings.url.get_secret_value(),  # only host, port and vhost are kept
        version=package_version(),
    )
    output: Path | None = args.output
    text = render(document, yaml=output is not None and output.suffix in (".yaml", ".yml"))
    if output is None:
        sys.stdout.write(text)
    else:
        await asyncio.to_thread(output.write_text, text, encoding="utf-8")
        print(f"wrote the AsyncAPI document of {document['info']['title']} to {output}")
    return 0


async def call(args: argparse.Namespace, settings: Settings) -> int:
    payload = json_object(args.payload)
    async with connected(settings) as transport:
        async with RpcClient(
            transport,
            topology=settings.topology,
            settings=settings.rpc,
            publish_timeout_s=settings.connection.publish_timeout_s,
            max_message_bytes=settings.connection.max_message_bytes,
            tracing=tracing_from(settings),
        ) as client:
            response = await client.send(
                args.agent,
                args.action,
                payload,
                priority=args.priority,
                timeout_s=args.timeout if args.timeout is not None else settings.rpc.timeout_s,
            )
    print(response.model_dump_json(exclude_none=True))
    return 0 if response.ok else 1


async def publish(args: argparse.Namespace, settings: Settings) -> int:
    payload = json_object(args.payload)
    async with connected(settings) as transport:
        bus = event_bus(transport, settings)
        await bus.start()
        event_id = await bus.publish(args.event_type, payload)
        await bus.aclose()
    print(json.dumps({"published": args.event_type, "id": event_id}))
    return 0


async def listen(args: argparse.Namespace, settings: Settings) -> int:
    stop = asyncio.Event()
    on_stop_signals(lambda _signum: stop.set())
    loop = asyncio.get_running_loop()
    seen = 0
    started = loop.time()

    async def show(event: Event) -> None:
        nonlocal seen
        line = {
            "type": event.type,
            "id": event.id,
            "timestamp": event.timestamp.isoformat(),
            "payload": event.payload,
        }
        print(json.dumps(line), flush=True)
        seen += 1
        if args.count is not None and seen >= args.count:
            stop.set()

    async def until_stopped(delivery: Delivery, process: Process) -> None:
        # Events fetched ahead (prefetch) after the last one we print go back to the
        # queue (with --group they belong to the group, not to this listener): left
        # unsettled, the close of our channel requeues them. A nack would send each
        # straight back to this consumer, still open until the close: a hot loop.
        if not stop.is_set():
            await process(delivery)

    lost = asyncio.Event()
    async with connected(settings) as transport:
        exit_when_lost(transport, settings, lost)
        bus = event_bus(transport, settings, guard=until_stopped)
        await bus.start()
        await bus.subscribe(args.pattern, show, group=args.group)
        print(f"listening for {args.pattern!r} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(lost.wait())}
        _done, pending = await asyncio.wait(
            waits, timeout=args.duration, return_when=asyncio.FIRST_COMPLETED
        )
        for future in pending:
            future.cancel()
        await bus.aclose()
    if lost.is_set():
        why = "the broker connection was lost"
    elif args.count is not None and seen >= args.count:
        why = f"--count {args.count} reached"
    elif stop.is_set():
        why = "stopped"
    else:
        why = f"--duration {args.duration:g}s passed"
    print(
        f"listened for {args.pattern!r} {loop.time() - started:.1f}s: {seen} event(s); {why}",
        file=sys.stderr,
        flush=True,
    )
    if lost.is_set():
        raise BrokerUnavailableError("the broker connection was lost")
    return 0


def _queue_names(args: argparse.Namespace, settings: Settings) -> list[str]:
    topology = settings.topology
    agents: list[str] = list(args.agent or [])
    if args.app:
        agents += [agent.name for agent in load_agents(args.app)]
    names: list[str] = []
    for agent in dict.fromkeys(agents):
        names += [topology.agent_queue(agent), topology.agent_dead_letter_queue(agent)]
    for group in dict.fromkeys(args.group or []):
        names += [topology.group_queue(group), topology.group_dead_letter_queue(group)]
    names += list(args.queue or [])
    if not names:
        raise ConfigurationError(
            "name the queues: --agent A, --group G, --app MODULE:ATTR or QUEUE"
        )
    return names


async def queues(args: argparse.Namespace, settings: Settings) -> int:
    names = _queue_names(args, settings)
    rows: list[tuple[str, str, str]] = []
    async with connected(settings) as transport:
        for name in names:
            try:
                info = await transport.queue_info(name)
            except QueueNotFoundError:
                rows.append((name, "-", "missing"))
                continue
            rows.append((name, str(info.messages), str(info.consumers)))
    width = max(len(name) for name, _, _ in rows)
    print(f"{'queue':<{width}}  {'ready':>8}  {'consumers':>9}")
    for name, ready, consumers in rows:
        print(f"{name:<{width}}  {ready:>8}  {consumers:>9}")
    return 0


async def exporter(args: argparse.Namespace, settings: Settings) -> int:
    names = _queue_names(args, settings)
    metrics = Metrics()
    metrics.initialise(actions={}, queues=names)  # probe errors at 0, not "No data"
    transport = create_transport(settings.connection)
    monitor = QueueMonitor(
        transport, metrics, lambda: names, interval_s=settings.metrics.depth_interval_s
    )
    stop = asyncio.Event()
    on_stop_signals(lambda _signum: stop.set())
    lost = asyncio.Event()
    server = HealthServer(
        {
            "/metrics": lambda: ProbeResult(200, metrics.exposition(), CONTENT_TYPE),
            "/healthz": lambda: (
                ProbeResult(200, b"ok\n")
                if transport.is_connected
                else ProbeResult(503, b"broker connection lost\n")
            ),
        },
        port=args.port,
    )
    await server.start()
    try:
        await transport.connect()
        exit_when_lost(transport, settings, lost)
        monitor.start()
        log.info("exporting depth of %d queue(s) on :%d/metrics", len(names), server.port)
        waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(lost.wait())}
        _done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for future in pending:
            future.cancel()
    finally:
        await monitor.aclose()
        await server.aclose()
        await transport.aclose()
    if lost.is_set():
        raise BrokerUnavailableError("the broker connection was lost")
    return 0


async def dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    async with connected(settings) as transport:
        letters = DeadLetters(transport, topology=settings.topology)
        if args.replay is not None:
            replayed = await letters.replay(args.agent, limit=args.replay)
            left = await letters.count(args.agent)
            print(json.dumps({"agent": args.agent, "replayed": replayed, "left": left}))
            return 0
        total = await letters.count(args.agent)
        shown = await letters.peek(args.agent, limit=args.limit) if total else []
    print(f"{total} dead letter(s) for {args.agent}" + (f", oldest {len(shown)}:" if shown else ""))
    for letter in shown:
        print(
            json.dumps(
                {
                    "message_id": letter.message_id,
                    "action": letter.action,
                    "error": letter.error_code,
                    "message": letter.error_message,
                    "attempts": letter.attempts,
                    "at_ms": letter.dead_lettered_at_ms,
                    "body": letter.body.decode("utf-8", errors="replace")[:200],
                }
            )
        )
    return 0


async def demo(args: argparse.Namespace, settings: Settings) -> int:
    where = "memory:// (the in-process broker)"
    if not is_memory_url(settings.url.get_secret_value()):
        where = redact_url(settings.url.get_secret_value())
    print(f"amqp-agents demo on {where}")
    broker = InMemoryBroker()  # shared by the demo's connections when on memory://

    def open_transport() -> Transport:
        return create_transport(settings.connection, memory_broker=broker)

    ok = await run_demo(settings, open_transport, sys.stdout)
    print("\ndemo finished: every reply was as expected" if ok else "\ndemo: unexpected replies")
    return 0 if ok else 1
