"""``amqp-agents run``: a supervised worker with its probes, metrics and signals.

SIGTERM or SIGINT stops it gracefully (the grace period of the settings); a second one
stops it at once (the broker requeues what was in flight; exit code 128 + signal).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from typing import TYPE_CHECKING

from amqp_agents.cli.plumbing import load_agents, on_stop_signals, tracing_from
from amqp_agents.config import Settings, redact_url
from amqp_agents.metrics import CONTENT_TYPE, Metrics
from amqp_agents.runtime.health import HealthServer, LoopWatch, ProbeResult
from amqp_agents.runtime.supervisor import Supervisor
from amqp_agents.runtime.worker import Worker
from amqp_agents.transport.factory import create_transport

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence

    from amqp_agents.runtime.agent import Agent
    from amqp_agents.transport.base import Transport

__all__ = ["initialise_metrics", "run", "worker_probes"]

log = logging.getLogger("amqp_agents.cli")


async def run(args: argparse.Namespace, settings: Settings) -> int:
    agents = load_agents(args.target)
    metrics = Metrics()
    initialise_metrics(metrics, agents, settings)
    tracing = tracing_from(settings)

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

    on_stop_signals(on_signal)
    watch = LoopWatch()
    # Probes first: liveness holds while connecting, readiness says 503 until consuming.
    probes: HealthServer | None = None
    port = settings.metrics.port
    if port is not None:
        probes = HealthServer(
            worker_probes(supervisor, metrics, watch, settings.metrics.loop_lag_limit_s),
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
    _freeze_startup_heap()
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


def worker_probes(
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


def initialise_metrics(metrics: Metrics, agents: Sequence[Agent], settings: Settings) -> None:
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


def _freeze_startup_heap() -> None:
    """Take what start-up made (modules, pydantic schemas, agents) out of the cyclic
    garbage collector's reach, once, before serving.

    A full collection walks every tracked object; in a worker most of them are these,
    alive for the whole process. Walking them (10-40 ms here) stalled the deliveries
    behind it: the p99 of an event's publish-to-handler latency was 5-38 ms, and 0.7-0.8
    ms with them frozen (``python -m benchmarks --case events.g1``). Garbage made before
    is collected first; nothing made afterwards is affected.
    """
    gc.collect()
    gc.freeze()
    log.debug("froze %d start-up objects out of the garbage collector's way", gc.get_freeze_count())


def _loop_name() -> str:
    """``uvloop`` or ``asyncio``: the running loop's kind, for the start log line."""
    return (
        "uvloop"
        if type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        else ("asyncio")
    )
