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
import math
import os
import signal
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pydantic import SecretStr, ValidationError
from pydantic_settings import SettingsError

from amqp_agents.config import (
    DEFAULT_URL,
    MAX_TIMEOUT_S,
    MetricsSettings,
    RpcSettings,
    Settings,
    WorkerSettings,
    load_settings,
    redact_url,
)
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


_EPILOG = """\
examples:
  amqp-agents run amqp_agents.examples.tasks:app --metrics-port 9100
  amqp-agents call task_manager task_add '{"title": "write docs"}' --priority 7
  amqp-agents call task_manager task_add @payload.json       (or - for stdin)
  amqp-agents listen 'task.*' --count 10
  amqp-agents dead-letters task_manager --replay 1
  amqp-agents demo

global options (--url, --config, --log-level, --log-json) go before or after the command.
settings come from AMQP_AGENTS_* environment variables (config/amqp-agents.env.example);
command-line options override them.

exit codes:
  0    success
  1    an error reply (still printed), or a failure such as an unreachable broker
  2    bad usage or configuration (one line on stderr names the problem)
  130  stopped at once by a second Ctrl-C (143 for a second SIGTERM)
"""

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _Help(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout (examples, exit codes) as written."""


def _number(
    kind: Callable[[str], float], *, minimum: float, maximum: float = math.inf, what: str
) -> Callable[[str], float]:
    """An argparse type: a finite number in [minimum, maximum]."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {what}") from None
        if not (math.isfinite(value) and minimum <= value <= maximum):
            bound = (
                f"between {minimum:g} and {maximum:g}"
                if maximum < math.inf
                else (f"at least {minimum:g}")
            )
            raise argparse.ArgumentTypeError(f"must be {bound}, not {text}")
        return value

    return parse


_SECONDS = _number(float, minimum=1e-3, what="number of seconds")
_COUNT = _number(int, minimum=1, what="whole number")


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The options every command takes. On a command's parser their defaults are
    suppressed, so that one given before the command is not reset after it."""
    extra: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
    parser.add_argument(
        "--url",
        help="broker URL, vhost in the path, or memory://"
        f" (default: $AMQP_URL, else {DEFAULT_URL})",
        **extra,
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="settings file (.json or .toml); environment variables override it",
        **extra,
    )
    parser.add_argument(
        "--log-json",
        action="store_true",
        help="log one JSON object per line (to stderr) instead of text",
        **extra,
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=_LOG_LEVELS,
        metavar="LEVEL",
        help=f"{', '.join(_LOG_LEVELS)} (default: INFO; WARNING for demo)",
        **extra,
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="amqp-agents",
        description="Agents that answer requests and events over RabbitMQ.",
        epilog=_EPILOG,
        formatter_class=_Help,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _global_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _Parser(add_help=False)
    _global_options(common, suppress=True)

    def command(name: str, text: str, epilog: str | None = None) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=text,
            description=text,
            epilog=epilog,
            parents=[common],
            formatter_class=_Help,
        )

    worker = WorkerSettings()
    run = command(
        "run",
        "run a worker for the agents MODULE:ATTR names",
        "example: amqp-agents run greeter:Greeter --metrics-port 9100\n\n"
        "SIGTERM or Ctrl-C stops it gracefully (exit 0); a second one stops it at once,\n"
        "and the broker requeues the requests still running.",
    )
    run.add_argument(
        "target",
        metavar="MODULE:ATTR",
        help="an agent class, an instance, a list of them, or a function returning one",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve /metrics, /healthz and /readyz on this port"
        " (default: $AMQP_AGENTS_METRICS__PORT, else not served)",
    )
    run.add_argument(
        "--metrics-host",
        metavar="HOST",
        help="address to serve them on (default: $AMQP_AGENTS_METRICS__HOST, else"
        f" {MetricsSettings().host}: every interface)",
    )
    run.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        help="handlers running at once, and each queue's prefetch"
        f" (default: $AMQP_AGENTS_WORKER__CONCURRENCY, else {worker.concurrency})",
    )
    run.add_argument(
        "--grace-period",
        type=float,
        metavar="SECONDS",
        help="how long in-flight work may finish on stop"
        f" (default: $AMQP_AGENTS_WORKER__GRACE_PERIOD_S, else {worker.grace_period_s:g})",
    )

    call = command(
        "call",
        "call an agent and print its reply (JSON, on stdout)",
        "examples:\n"
        '  amqp-agents call greeter greet \'{"name": "Ada"}\' --timeout 5\n'
        "  amqp-agents call greeter greet @payload.json\n"
        '  echo \'{"name": "Ada"}\' | amqp-agents call greeter greet -\n\n'
        "exit codes: 0 a successful reply, 1 an error reply (printed) or a failure,\n"
        "2 bad usage (invalid JSON, priority, timeout, name)",
    )
    call.add_argument("agent", metavar="AGENT", help="the agent's name (its routing key)")
    call.add_argument("action", metavar="ACTION", help="the action to run")
    call.add_argument(
        "payload",
        nargs="?",
        default="{}",
        metavar="PAYLOAD",
        help="a JSON object; @FILE reads it from a file, - from stdin (default: {})",
    )
    call.add_argument(
        "--priority",
        type=int,
        default=int(Priority.NORMAL),
        choices=range(10),
        metavar="0-9",
        help=f"0 (lowest) to 9 (highest) (default: {int(Priority.NORMAL)})",
    )
    call.add_argument(
        "--timeout",
        type=_number(float, minimum=1e-3, maximum=MAX_TIMEOUT_S, what="number of seconds"),
        metavar="SECONDS",
        help="how long to wait for the reply, at most one day"
        f" (default: $AMQP_AGENTS_RPC__TIMEOUT_S, else {RpcSettings().timeout_s:g})",
    )

    publish = command(
        "publish",
        "publish an event",
        'example: amqp-agents publish task.created \'{"id": "42"}\'',
    )
    publish.add_argument("event_type", metavar="EVENT_TYPE", help="dotted words: task.created")
    publish.add_argument(
        "payload",
        nargs="?",
        default="{}",
        metavar="PAYLOAD",
        help="a JSON object; @FILE reads it from a file, - from stdin (default: {})",
    )

    listen = command(
        "listen",
        "print events matching PATTERN as JSON lines, until stopped",
        "example: amqp-agents listen 'task.*' --duration 60\n\n"
        "A summary goes to stderr when it ends (Ctrl-C, --count or --duration).",
    )
    listen.add_argument("pattern", metavar="PATTERN", help="topic pattern: task.*, task.#, #")
    listen.add_argument(
        "--group",
        help="consume the durable group queue events.GROUP, shared with the group's other"
        " members (default: a private queue of this listener's own)",
    )
    listen.add_argument(
        "--count", type=_COUNT, metavar="N", help="exit after N events (default: no limit)"
    )
    listen.add_argument(
        "--duration",
        type=_SECONDS,
        metavar="SECONDS",
        help="exit after this many seconds (default: no limit)",
    )

    for name, text in (
        ("queues", "print ready messages and consumers of agent and event queues"),
        ("exporter", "serve only queue-depth metrics (for queues whose consumers are not ours)"),
    ):
        sub = command(
            name,
            text,
            f"example: amqp-agents {name} --agent task_manager"
            + (" --port 9101" if name == "exporter" else ""),
        )
        sub.add_argument("queue", nargs="*", metavar="QUEUE", help="queue names, as they are")
        sub.add_argument(
            "--agent", action="append", help="an agent: its queue and .dead (repeatable)"
        )
        sub.add_argument(
            "--group", action="append", help="an event group: its queue and .dead (repeatable)"
        )
        sub.add_argument("--app", metavar="MODULE:ATTR", help="every agent of an app")
        if name == "exporter":
            sub.add_argument("--port", type=int, required=True, help="port for /metrics")

    dead = command(
        "dead-letters",
        "list an agent's dead letters, or replay them to the agent",
        "examples:\n  amqp-agents dead-letters payments\n"
        "  amqp-agents dead-letters payments --replay 1",
    )
    dead.add_argument("agent", metavar="AGENT", help="the agent's name")
    dead.add_argument(
        "--limit",
        type=_COUNT,
        default=20,
        metavar="N",
        help="how many to list, oldest first (default: 20)",
    )
    dead.add_argument(
        "--replay",
        type=_COUNT,
        metavar="N",
        help="send the oldest N back to the agent's queue instead of listing",
    )

    command(
        "demo",
        "run the example app end to end in one process and print a transcript"
        " (on the in-process broker unless --url is given)",
    )
    return parser


def _version() -> str:
    try:
        return metadata.version("amqp-agents")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        return "unknown"


def _settings(args: argparse.Namespace) -> Settings:
    """Settings: file (--config), then environment, then command-line options on top."""
    overrides: dict[str, Any] = {}
    if args.url:
        overrides["url"] = SecretStr(args.url)
    metrics: dict[str, Any] = {}
    if getattr(args, "metrics_port", None) is not None:
        metrics["port"] = args.metrics_port
    if getattr(args, "metrics_host", None) is not None:
        metrics["host"] = args.metrics_host
    if metrics:
        overrides["metrics"] = metrics
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
        if supervisor.consumers_lost:
            return ProbeResult(503, b"consumers lost while running\n")
        return ProbeResult(200, b"ok\n")

    def readyz() -> ProbeResult:
        if supervisor.is_ready:
            return ProbeResult(200, b"ready\n")
        if supervisor.is_blocked:
            return ProbeResult(503, b"the broker blocks publishing (memory or disk alarm)\n")
        return ProbeResult(503, b"not ready\n")

    def metrics_page() -> ProbeResult:
        return ProbeResult(200, metrics.exposition(), CONTENT_TYPE)

    return {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics_page}


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    agents = load_agents(args.target)
    metrics = Metrics()

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

    # The supervisor rebuilds transport and worker after a loss: no reconnecting inside.
    once = settings.connection.model_copy(update={"reconnect": False})
    supervisor = Supervisor(lambda: create_transport(once), build_worker, metrics=metrics)
    stop = asyncio.Event()
    serving = asyncio.ensure_future(supervisor.run(stop))
    stopped_at_once: list[int] = []

    def on_signal(signum: int) -> None:
        in_flight = supervisor.worker.in_flight if supervisor.worker is not None else 0
        name = signal.Signals(signum).name
        if not stop.is_set():
            log.info(
                "%s: stopping gracefully, %d request(s) in flight, up to %gs to finish"
                " (send it again to stop at once)",
                name,
                in_flight,
                settings.worker.grace_period_s,
            )
            stop.set()
            return
        log.warning(
            "%s again: stopping at once; the broker requeues the %d request(s) in flight",
            name,
            in_flight,
        )
        stopped_at_once.append(signum)
        serving.cancel()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    watch = LoopWatch()
    # Probes first: liveness holds while connecting, readiness says 503 until consuming.
    probes: HealthServer | None = None
    port = settings.metrics.port
    if port is not None:
        probes = HealthServer(
            _worker_probes(supervisor, metrics, watch, settings.metrics.loop_lag_limit_s),
            host=settings.metrics.host,
            port=port,
        )
        try:
            await probes.start()
        except BaseException:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
            raise
        watch.start()
    _log_start(agents, settings, probes)
    try:
        await serving
    except asyncio.CancelledError:
        if not stopped_at_once:
            raise
    finally:
        await watch.aclose()
        if probes is not None:
            await probes.aclose()
    if stopped_at_once:
        log.info("worker stopped at once (%d reconnect(s))", supervisor.reconnects)
        return 128 + stopped_at_once[0]
    log.info("worker stopped (%d reconnect(s))", supervisor.reconnects)
    return 0


def _log_start(agents: Sequence[Agent], settings: Settings, probes: HealthServer | None) -> None:
    """Say what this worker serves, where, and on which event loop."""
    log.info(
        "worker on %s, %s event loop, concurrency %d",
        redact_url(settings.url.get_secret_value()),
        _loop_name(),
        settings.worker.concurrency,
    )
    for agent in agents:
        actions = ", ".join(sorted(agent.action_names)) or "none"
        patterns = ", ".join(
            f"{spec.pattern} ({'broadcast' if spec.group is None else 'group ' + spec.group})"
            for spec, _handler in agent.event_handlers()
        )
        log.info(
            "agent %s: actions %s; events %s",
            agent.name,
            actions,
            patterns or "none",
            extra={"agent": agent.name},
        )
    if probes is None:
        log.info("metrics and probes not served (use --metrics-port)")
    else:
        host = settings.metrics.host
        shown = f"[{host}]" if ":" in host else host
        log.info("serving /metrics, /healthz and /readyz on http://%s:%d", shown, probes.port)


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


def _read_payload(text: str) -> str:
    """The payload argument's text: ``-`` reads stdin, ``@FILE`` a file, else itself."""
    if text == "-":
        return sys.stdin.read()
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigurationError(f"cannot read the payload file {path}: {reason}") from None
    return text


def _json_object(text: str) -> dict[str, Any]:
    text = _read_payload(text)
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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
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


async def _dead_letters(args: argparse.Namespace, settings: Settings) -> int:
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
        with asyncio.Runner(loop_factory=_loop_factory(settings.event_loop)) as runner:
            return runner.run(command[args.command](args, settings))
    except ValidationError as exc:
        print(f"amqp-agents: configuration error: {_describe(exc)}", file=sys.stderr)
        return 2
    except (ConfigurationError, SettingsError) as exc:
        print(f"amqp-agents: configuration error: {exc}", file=sys.stderr)
        return 2
    except AmqpAgentsError as exc:
        print(f"amqp-agents: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _describe(exc: ValidationError) -> str:
    """A validation error as one line: each bad setting's dotted name and what is wrong
    (pydantic's own text spans lines and ends in a link per error)."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in error["loc"])
        parts.append(f"{where}: {error['msg']}" if where else error["msg"])
    return "; ".join(parts)


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``event_loop`` asks for: uvloop when installed (``auto``), unless
    ``asyncio`` is chosen; ``uvloop`` insists on it.

    Raises:
        ConfigurationError: ``uvloop`` is asked for but not installed.
    """
    if choice == "asyncio":
        return None
    try:
        import uvloop  # an optional extra (amqp-agents[speed])
    except ImportError:
        if choice == "uvloop":
            raise ConfigurationError(
                "event_loop is uvloop but uvloop is not installed: pip install 'amqp-agents[speed]'"
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _loop_name() -> str:
    """``uvloop`` or ``asyncio``: the running loop's kind, for the start log line."""
    return (
        "uvloop"
        if type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        else ("asyncio")
    )
