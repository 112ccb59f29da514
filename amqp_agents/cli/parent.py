"""``amqp-agents run --processes N`` (N > 1): the parent of N worker processes.

One Python process uses one core. The parent starts N children, each exactly
``amqp-agents run`` with one process (this command line again, with ``--processes 1``),
and keeps them running with a :class:`~amqp_agents.runtime.processes.ProcessGroup`
(restarts with backoff, a bounded crash loop, signals forwarded; exit codes there). The
children compete for the same queues, as several pods would.

With a metrics port, only the parent listens on it; each child serves its own probes
and metrics on a private loopback port, chosen free at each start. The parent serves:

* ``/healthz``: its own state: 503 while a child is crash-looping or after it gave up;
* ``/readyz``: 200 only when every child is running and its own ``/readyz`` says 200
  (asked when probed, each answer bounded by :data:`CHILD_TIMEOUT_S`);
* ``/metrics``: every child's page, each sample labelled ``process="<index>"``, and
  ``amqp_agents_process_up{process}`` (1: the child answered this scrape) and
  ``amqp_agents_process_restarts_total{process}``.

Why the parent scrapes its children rather than using prometheus_client's
multiprocess mode: that mode chooses its value store from ``PROMETHEUS_MULTIPROC_DIR``
when the library is imported (process-global state); it exports every metric of the
process whatever its registry (ours live on explicit registries); each gauge needs an
aggregation mode (``in_flight`` sums, ``queue_depth`` does not) and dead processes'
files need cleaning; and every increment becomes a write to a shared memory-mapped
file on the hot path. Scraping keeps each child an unchanged one-process worker, costs
nothing between scrapes, and leaves aggregation to PromQL, as with pods
(``sum without (process) (...)``); a restarted child's counters restart at 0, which
``rate()`` handles. Per-child public ports would make Prometheus track N targets
that move at each restart; here there is one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

from amqp_agents.cli.plumbing import load_agents, on_stop_signals
from amqp_agents.cli.scrape import Response, get, merge_metrics
from amqp_agents.errors import ConfigurationError
from amqp_agents.metrics import CONTENT_TYPE
from amqp_agents.runtime.health import HealthServer, ProbeResult
from amqp_agents.runtime.processes import Child, ProcessGroup

if TYPE_CHECKING:
    import argparse
    from collections.abc import Awaitable, Callable, Sequence

    from amqp_agents.config import Settings

__all__ = ["CHILD_TIMEOUT_S", "child_command", "parent_probes", "run_processes"]

log = logging.getLogger("amqp_agents.cli")

CHILD_TIMEOUT_S = 2.0
"""How long the parent waits for a child's probe or metrics page."""


async def run_processes(
    args: argparse.Namespace, settings: Settings, *, argv: Sequence[str]
) -> int:
    """Run ``settings.worker.processes`` workers of this command line (``argv``, without
    the program name) until a stop signal; the exit code of the group.

    Raises:
        ConfigurationError: the in-process broker (``memory://``) cannot be shared by
            processes; the target does not load; the metrics port cannot be bound.
    """
    if settings.url.get_secret_value().startswith("memory:"):
        raise ConfigurationError("--processes needs a broker: memory:// lives in one process")
    load_agents(args.target)  # a bad MODULE:ATTR fails here (exit 2), not as a crash loop
    client_name = settings.connection.client_name
    group = ProcessGroup(
        settings.worker.processes,
        lambda child: child_command(argv, child),
        # The child's index in its connection names: ``<name>.<index>/consume``.
        environment=lambda child: {
            **os.environ,
            "AMQP_AGENTS_CONNECTION__CLIENT_NAME": f"{client_name}.{child.index}",
        },
        ports=settings.metrics.port is not None,
        grace_period_s=settings.worker.grace_period_s,
    )
    on_stop_signals(group.stop)
    probes: HealthServer | None = None
    if settings.metrics.port is not None:
        probes = HealthServer(
            parent_probes(group), host=settings.metrics.host, port=settings.metrics.port
        )
        await probes.start()
        log.info(
            "serving /metrics, /healthz and /readyz of %d processes on port %d",
            len(group.children),
            probes.port,
        )
    log.info("starting %d worker processes", len(group.children))
    try:
        return await group.run()
    finally:
        if probes is not None:
            await probes.aclose()


def child_command(argv: Sequence[str], child: Child) -> list[str]:
    """This command line again, as one process: ``python -m amqp_agents ARGV
    --processes 1``, on the child's loopback port if it has one (later options win)."""
    command = [sys.executable, "-m", "amqp_agents", *argv, "--processes", "1"]
    if child.port is not None:
        command += ["--metrics-port", str(child.port), "--metrics-host", "127.0.0.1"]
    return command


def parent_probes(group: ProcessGroup) -> dict[str, Callable[[], Awaitable[ProbeResult]]]:
    """The parent's routes: its own liveness, every child's readiness, all metrics."""

    async def healthz() -> ProbeResult:
        failure = group.liveness_failure()
        if failure is not None:
            return ProbeResult(503, f"{failure}\n".encode())
        return ProbeResult(200, b"ok\n")

    async def readyz() -> ProbeResult:
        if group.stopping:
            return ProbeResult(503, b"stopping\n")
        answers = await _ask_every_child(group, "/readyz")
        waiting = [
            f"process {child.index}: {_why_not_ready(child, answer)}"
            for child, answer in zip(group.children, answers, strict=True)
            if answer is None or answer.status != 200
        ]
        if waiting:
            return ProbeResult(503, ("\n".join(waiting) + "\n").encode())
        return ProbeResult(200, f"ready ({len(group.children)} processes)\n".encode())

    async def metrics() -> ProbeResult:
        answers = await _ask_every_child(group, "/metrics")
        up = GaugeMetricFamily(
            "amqp_agents_process_up",
            "1 if the worker process answered this scrape",
            labels=["process"],
        )
        restarts = CounterMetricFamily(
            "amqp_agents_process_restarts",
            "Worker processes started again after an exit",
            labels=["process"],
        )
        pages = {}
        for child, answer in zip(group.children, answers, strict=True):
            if answer is not None and answer.status == 200:
                pages[child.index] = answer.body
            up.add_metric([str(child.index)], 1.0 if child.index in pages else 0.0)
            restarts.add_metric([str(child.index)], child.restarts)
        return ProbeResult(200, merge_metrics(pages, [up, restarts]), CONTENT_TYPE)

    return {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics}


async def _ask_every_child(group: ProcessGroup, path: str) -> list[Response | None]:
    """Each child's answer to ``GET path``, in order; ``None`` when it is not running or
    does not answer within :data:`CHILD_TIMEOUT_S`."""

    async def ask(child: Child) -> Response | None:
        if child.pid is None or child.port is None:
            return None
        return await get(child.port, path, timeout_s=CHILD_TIMEOUT_S)

    return list(await asyncio.gather(*(ask(child) for child in group.children)))


def _why_not_ready(child: Child, answer: Response | None) -> str:
    if answer is None:
        return "not running" if child.pid is None else "no answer"
    return answer.body.decode(errors="replace").strip() or f"status {answer.status}"
