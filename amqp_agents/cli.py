"""The ``amqp-agents`` command: run a worker, call an agent, publish and listen to events.

The only module that reads the environment, parses arguments and installs signal
handlers; everything below it takes explicit arguments. Exit codes: 0 success,
1 an error reply or a failed run, 2 bad usage or configuration.

It is over 450 lines because each command (run, call, publish, listen, queues,
exporter, dead-letters, demo) keeps its plumbing beside it; writing connect/close and
signal handling once (issue 19) is what will shrink it.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import SecretStr, ValidationError
from pydantic_settings import SettingsError

from amqp_agents.cli_parser import build_parser
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
from amqp_agents.models.messages import Event  # noqa: TC001  # handler annotations are read at run time
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
    import argparse
    from collections.abc import Callable, Sequence

    from amqp_agents.tracing import Tracing
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
    tracing = _tracing(settings)

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
            tracing=tracing,
        )

    # The transport reconnects by itself and the worker re-attaches its consumers in
    # place; the supervisor starts over only when they cannot heal (see Recovery).
    healing = settings.connection.model_copy(update={"reconnect": True})
    supervisor = Supervisor(lambda: create_transport(healing), build_worker, metrics=metrics)
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
        tracing=_tracing(settings),
    )


def _tracing(settings: Settings) -> Tracing | None:
    """The spans' maker when tracing is enabled (imported only then: it is optional)."""
    if not settings.tracing.enabled:
        return None
    try:
        from amqp_agents.tracing import Tracing
    except ImportError as exc:
        raise ConfigurationError(str(exc)) from None
    url = urlsplit(settings.url.get_secret_value())
    return Tracing(server_address=url.hostname, server_port=url.port or _default_port(url.scheme))


def _default_port(scheme: str) -> int | None:
    return {"amqp": 5672, "amqps": 5671}.get(scheme)


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
            tracing=_tracing(settings),
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
    args = build_parser().parse_args(argv)
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
