"""The ``amqp-agents`` command: run a worker, call an agent, publish and listen to events.

The only module that reads the environment, parses arguments and installs signal
handlers; everything below it takes explicit arguments. Exit codes: 0 success,
1 an error reply or a failed run, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr, ValidationError
from pydantic_settings import SettingsError

from amqp_agents.config import Settings, load_settings, redact_url
from amqp_agents.errors import (
    AmqpAgentsError,
    BrokerUnavailableError,
    ConfigurationError,
    QueueNotFoundError,
)
from amqp_agents.events.bus import DeliveryGuard, EventBus, Process
from amqp_agents.examples.demo import run_demo
from amqp_agents.logs import configure as configure_logging
from amqp_agents.metrics import CONTENT_TYPE, Metrics
from amqp_agents.models.messages import Event, Priority
from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.agent import Agent
from amqp_agents.runtime.dead_letters import DeadLetters
from amqp_agents.runtime.health import HealthServer, LoopWatch, ProbeResult
from amqp_agents.runtime.monitor import QueueMonitor
from amqp_agents.runtime.supervisor import Supervisor
from amqp_agents.runtime.worker import Worker
from amqp_agents.transport.factory import create_transport, is_memory_url
from amqp_agents.transport.memory import InMemoryBroker

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from amqp_agents.transport.base import Delivery, Transport

__all__ = ["load_agents", "main"]

log = logging.getLogger("amqp_agents.cli")


def load_agents(target: str) -> list[Agent]:
    """Import ``MODULE:ATTR``; ATTR is an agent, an agent class, a list of them, or a
    callable returning one of those."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigurationError(f"expected MODULE:ATTR, got {target!r}")
    # Like ``python -m``: modules of the current directory are importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r}: {exc}") from None
    try:
        value: Any = getattr(module, attr)
    except AttributeError:
        raise ConfigurationError(f"module {module_name!r} has no attribute {attr!r}") from None
    if callable(value) and not isinstance(value, type | Agent):
        value = value()
    items = value if isinstance(value, list | tuple) else [value]
    agents: list[Agent] = []
    for item in items:
        if isinstance(item, type) and issubclass(item, Agent):
            item = item()
        if not isinstance(item, Agent):
            raise ConfigurationError(f"{target} gave {item!r}, which is not an Agent")
        agents.append(item)
    if not agents:
        raise ConfigurationError(f"{target} names no agents")
    return agents


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amqp-agents", description="Agents that answer requests over RabbitMQ."
    )
    parser.add_argument(
        "--url", help="broker URL (default: $AMQP_URL or amqp://guest:guest@localhost:5672/)"
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="settings file (.json or .toml); environment variables override it",
    )
    parser.add_argument(
        "--log-json", action="store_true", help="log one JSON object per line (to stderr)"
    )
    parser.add_argument(
        "--log-level", help="DEBUG, INFO, WARNING, ERROR (default INFO; WARNING for demo)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a worker for the agents MODULE:ATTR names")
    run.add_argument("target", metavar="MODULE:ATTR")
    run.add_argument(
        "--metrics-port", type=int, help="serve /metrics, /healthz and /readyz on this port"
    )
    run.add_argument("--concurrency", type=int, help="handlers running at once")
    run.add_argument("--grace-period", type=float, help="seconds in-flight work may finish on stop")

    call = commands.add_parser("call", help="call an agent and print its reply")
    call.add_argument("agent")
    call.add_argument("action")
    call.add_argument("payload", nargs="?", default="{}", metavar="JSON")
    call.add_argument("--priority", type=int, default=int(Priority.NORMAL), help="0-9")
    call.add_argument("--timeout", type=float, help="seconds to wait for the reply")

    publish = commands.add_parser("publish", help="publish an event")
    publish.add_argument("event_type", metavar="EVENT_TYPE")
    publish.add_argument("payload", nargs="?", default="{}", metavar="JSON")

    listen = commands.add_parser("listen", help="print events matching PATTERN as they happen")
    listen.add_argument("pattern", metavar="PATTERN", help="topic pattern: task.*, task.#, #")
    listen.add_argument(
        "--group", help="consume the durable group queue events.GROUP instead of a private one"
    )
    listen.add_argument("--count", type=int, help="exit after this many events")
    listen.add_argument("--duration", type=float, help="exit after this many seconds")

    for name, text in (
        ("queues", "print ready messages and consumers of agent and event queues"),
        ("exporter", "serve only queue-depth metrics (for queues whose consumers are not ours)"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("queue", nargs="*", metavar="QUEUE", help="queue names, as they are")
        sub.add_argument("--agent", action="append", help="an agent: its queue and .dead")
        sub.add_argument("--group", action="append", help="an event group: its queue and .dead")
        sub.add_argument("--app", metavar="MODULE:ATTR", help="every agent of an app")
        if name == "exporter":
            sub.add_argument("--port", type=int, required=True, help="port for /metrics")

    dead = commands.add_parser(
        "dead-letters", help="list an agent's dead letters, or replay them to the agent"
    )
    dead.add_argument("agent", metavar="AGENT")
    dead.add_argument("--limit", type=int, default=20, help="how many to list (oldest first)")
    dead.add_argument(
        "--replay", type=int, metavar="N", help="send the oldest N back to the agent's queue"
    )

    commands.add_parser(
        "demo",
        help="run the example app end to end in one process and print a transcript"
        " (on the in-process broker unless --url is given)",
    )
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    """Settings: file (--config), then environment, then command-line options on top."""
    overrides: dict[str, Any] = {}
    if args.url:
        overrides["url"] = SecretStr(args.url)
    worker: dict[str, Any] = {}
    if getattr(args, "concurrency", None) is not None:
        worker["concurrency"] = args.concurrency
    if getattr(args, "grace_period", None) is not None:
        worker["grace_period_s"] = args.grace_period
    if worker:
        overrides["worker"] = worker
    return load_settings(args.config, **overrides)


def _worker_probes(
    supervisor: Supervisor, metrics: Metrics, watch: LoopWatch, limit_s: float
) -> dict[str, Callable[[], ProbeResult]]:
    def healthz() -> ProbeResult:
        if watch.lag_s > limit_s:
            return ProbeResult(503, f"event loop lagging {watch.lag_s:.1f}s\n".encode())
        failure = supervisor.liveness_failure()
        if failure is not None:
            return ProbeResult(503, f"{failure}\n".encode())
        return ProbeResult(200, b"ok\n")

    def readyz() -> ProbeResult:
        if supervisor.is_ready:
            return ProbeResult(200, b"ready\n")
        why = supervisor.not_ready_reason() or "not ready"
        return ProbeResult(503, f"{why}\n".encode())

    def metrics_page() -> ProbeResult:
        return ProbeResult(200, metrics.exposition(), CONTENT_TYPE)

    return {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics_page}


def _initialise_metrics(metrics: Metrics, agents: Sequence[Agent], settings: Settings) -> None:
    """Every label set the agents can produce, at 0 before any work (see Metrics.initialise)."""
    topology = settings.topology
    groups = sorted(
        {spec.group for agent in agents for spec, _ in agent.event_handlers() if spec.group}
    )
    agent_queues = [topology.agent_queue(agent.name) for agent in agents]
    group_queues = [topology.group_queue(group) for group in groups]
    metrics.initialise(
        actions={agent.name: agent.action_names for agent in agents},
        groups=groups,
        queues=[
            *agent_queues,
            *(topology.agent_dead_letter_queue(agent.name) for agent in agents),
            *group_queues,
            *(topology.group_dead_letter_queue(group) for group in groups),
        ],
        consumed_queues=[*agent_queues, *group_queues],
    )


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    agents = load_agents(args.target)
    metrics = Metrics()
    _initialise_metrics(metrics, agents, settings)

    def build_worker(transport: Transport) -> Worker:
        return Worker(
            transport,
            agents,
            topology=settings.topology,
            settings=settings.worker,
            publish_timeout_s=settings.connection.publish_timeout_s,
            max_message_bytes=settings.connection.max_message_bytes,
            metrics=metrics,
            depth_interval_s=settings.metrics.depth_interval_s,
        )

    # The transport reconnects by itself and the worker re-attaches its consumers in
    # place; the supervisor starts over only when they cannot heal (see Recovery).
    healing = settings.connection.model_copy(update={"reconnect": True})
    supervisor = Supervisor(lambda: create_transport(healing), build_worker, metrics=metrics)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    watch = LoopWatch()
    # Probes first: liveness holds while connecting, readiness says 503 until consuming.
    probes: HealthServer | None = None
    if args.metrics_port is not None:
        probes = HealthServer(
            _worker_probes(supervisor, metrics, watch, settings.metrics.loop_lag_limit_s),
            port=args.metrics_port,
        )
        await probes.start()
        watch.start()
    log.info(
        "worker for %s on %s",
        ", ".join(agent.name for agent in agents),
        redact_url(settings.url.get_secret_value()),
    )
    try:
        await supervisor.run(stop)
    finally:
        await watch.aclose()
        if probes is not None:
            await probes.aclose()
    log.info("worker stopped (%d reconnect(s))", supervisor.reconnects)
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


async def _queues(args: argparse.Namespace, settings: Settings) -> int:
    names = _queue_names(args, settings)
    transport = create_transport(settings.connection)
    await transport.connect()
    rows: list[tuple[str, str, str]] = []
    try:
        for name in names:
            try:
                info = await transport.queue_info(name)
            except QueueNotFoundError:
                rows.append((name, "-", "missing"))
                continue
            rows.append((name, str(info.messages), str(info.consumers)))
    finally:
        await transport.aclose()
    width = max(len(name) for name, _, _ in rows)
    print(f"{'queue':<{width}}  {'ready':>8}  {'consumers':>9}")
    for name, ready, consumers in rows:
        print(f"{name:<{width}}  {ready:>8}  {consumers:>9}")
    return 0


def _exit_when_lost(transport: Transport, settings: Settings, lost: asyncio.Event) -> None:
    """Set ``lost`` when the connection dies for good: a transport that reconnects by
    itself (the default) comes back, and the command goes on."""
    if not settings.connection.reconnect:
        transport.on_connection_lost(lambda _exc: lost.set())


async def _exporter(args: argparse.Namespace, settings: Settings) -> int:
    names = _queue_names(args, settings)
    metrics = Metrics()
    metrics.initialise(actions={}, queues=names)  # probe errors at 0, not "No data"
    transport = create_transport(settings.connection)
    monitor = QueueMonitor(
        transport, metrics, lambda: names, interval_s=settings.metrics.depth_interval_s
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
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
        _exit_when_lost(transport, settings, lost)
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


def _json_object(text: str) -> dict[str, Any]:
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"the payload is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ConfigurationError("the payload must be a JSON object")
    return payload


def _event_bus(
    transport: Transport, settings: Settings, *, guard: DeliveryGuard | None = None
) -> EventBus:
    return EventBus(
        transport,
        topology=settings.topology,
        publish_timeout_s=settings.connection.publish_timeout_s,
        max_message_bytes=settings.connection.max_message_bytes,
        guard=guard,
    )


async def _publish(args: argparse.Namespace, settings: Settings) -> int:
    payload = _json_object(args.payload)
    transport = create_transport(settings.connection)
    await transport.connect()
    try:
        bus = _event_bus(transport, settings)
        await bus.start()
        event_id = await bus.publish(args.event_type, payload)
        await bus.aclose()
    finally:
        await transport.aclose()
    print(json.dumps({"published": args.event_type, "id": event_id}))
    return 0


async def _listen(args: argparse.Namespace, settings: Settings) -> int:
    if args.count is not None and args.count < 1:
        raise ConfigurationError("--count must be at least 1")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    seen = 0

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
        # queue: with --group they belong to the group, not to this listener.
        if stop.is_set():
            await delivery.nack(requeue=True)
        else:
            await process(delivery)

    transport = create_transport(settings.connection)
    await transport.connect()
    lost = asyncio.Event()
    _exit_when_lost(transport, settings, lost)
    try:
        bus = _event_bus(transport, settings, guard=until_stopped)
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
    finally:
        await transport.aclose()
    if lost.is_set():
        raise BrokerUnavailableError("the broker connection was lost")
    return 0


async def _dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    if args.replay is not None and args.replay < 1:
        raise ConfigurationError("--replay must be at least 1")
    if args.limit < 1:
        raise ConfigurationError("--limit must be at least 1")
    transport = create_transport(settings.connection)
    await transport.connect()
    try:
        letters = DeadLetters(transport, topology=settings.topology)
        if args.replay is not None:
            replayed = await letters.replay(args.agent, limit=args.replay)
            left = await letters.count(args.agent)
            print(json.dumps({"agent": args.agent, "replayed": replayed, "left": left}))
            return 0
        total = await letters.count(args.agent)
        shown = await letters.peek(args.agent, limit=args.limit) if total else []
    finally:
        await transport.aclose()
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


async def _demo(args: argparse.Namespace, settings: Settings) -> int:
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


async def _call(args: argparse.Namespace, settings: Settings) -> int:
    payload = _json_object(args.payload)
    transport = create_transport(settings.connection)
    await transport.connect()
    try:
        async with RpcClient(
            transport,
            topology=settings.topology,
            settings=settings.rpc,
            publish_timeout_s=settings.connection.publish_timeout_s,
            max_message_bytes=settings.connection.max_message_bytes,
        ) as client:
            response = await client.send(
                args.agent,
                args.action,
                payload,
                priority=args.priority,
                timeout_s=args.timeout if args.timeout is not None else settings.rpc.timeout_s,
            )
    finally:
        await transport.aclose()
    print(response.model_dump_json(exclude_none=True))
    return 0 if response.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``amqp-agents`` and ``python -m amqp_agents``."""
    args = _parser().parse_args(argv)
    configure_logging(
        args.log_level or ("WARNING" if args.command == "demo" else "INFO"),
        json_lines=args.log_json,
    )
    try:
        settings = _settings(args)
        if args.command == "demo" and not args.url:
            args.url = "memory://"  # the demo runs anywhere unless pointed at a broker
            settings = _settings(args)
        command = {
            "run": _run,
            "call": _call,
            "publish": _publish,
            "listen": _listen,
            "demo": _demo,
            "dead-letters": _dead_letters,
            "queues": _queues,
            "exporter": _exporter,
        }
        return asyncio.run(command[args.command](args, settings))
    except (ConfigurationError, ValidationError, SettingsError) as exc:
        print(f"amqp-agents: configuration error: {exc}", file=sys.stderr)
        return 2
    except AmqpAgentsError as exc:
        print(f"amqp-agents: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
