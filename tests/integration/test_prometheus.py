"""The dashboard and the alert rules against a real Prometheus, a real worker and RabbitMQ.

A Prometheus (Debian's ``prometheus`` package, started here on a free port with a temp
data dir; .ci/run installs it, and a missing one fails) scrapes every second:

- ``amqp-agents run amqp_agents.examples.tasks:app --metrics-port N`` in a fresh vhost
  (job amqp-agents-worker, as in deploy/prometheus/prometheus.yml),
- this test's RPC client with its own metrics (job amqp-agents-client: the RPC panels
  are the callers' view),
- RabbitMQ's rabbitmq_prometheus plugin, /metrics/detailed for the test's vhost (job
  rabbitmq, the families prometheus.yml asks for),

and loads deploy/prometheus/alerts.yml. Under a little load, every PromQL expression of
the Grafana dashboard (Grafana's variables replaced by what "All" and a short rate
interval give) and every alert rule is evaluated through the HTTP API: each must parse,
each dashboard query and each series selector of the rules must return series. Then the
worker is SIGKILLed, and the series the rules' unit tests (alerts.test.yml) assume for
that outage are checked to be what Prometheus really holds.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from amqp_agents.config import ConnectionSettings
from amqp_agents.metrics import CONTENT_TYPE, Metrics
from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.health import HealthServer, ProbeResult
from amqp_agents.testing import BrokerAdmin, url_for_vhost
from amqp_agents.transport.rabbitmq import RabbitTransport
from tests.agents_for_tests import CliProcess, cli_env, free_port
from tests.broker_env import rabbitmq_metrics_port
from tests.support import wait_until, wait_until_sync

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "amqp-agents.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
RABBITMQ_METRICS_PORT = rabbitmq_metrics_port()
WORKER_JOB = "amqp-agents-worker"
SCRAPE_S = 1
# Grafana's variables as the dashboard's defaults ("All") and a short scrape give them.
GRAFANA = {
    "__rate_interval": "10s",
    "__interval": "2s",
    "__range": "1m",
    "queue": ".*",
    "agent": ".*",
}
# Every metric the dashboard and rules name is set by a running worker.
NOT_SET_HERE: frozenset[str] = frozenset()
_SELECTOR = re.compile(
    r"\b(amqp_agents_[a-z0-9_]+|rabbitmq_[a-z0-9_]+|up(?=\s*\{))\s*(\{[^}]*\})?(?!\s*\()"
)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} not found: `apt-get install -y prometheus` (Debian's package; "
            ".ci/run installs it)",
            pytrace=False,
        )
    return path


def _http(url: str, timeout_s: float = 5.0) -> tuple[int, str] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310  # our URLs
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return None


@dataclass
class Prometheus:
    """A Prometheus server of this test, queried over its HTTP API."""

    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/PATH; the ``data`` of a success, else an AssertionError."""
        query = urllib.parse.urlencode(params)
        got = _http(f"http://127.0.0.1:{self.port}/api/v1/{path}?{query}")
        assert got is not None, f"Prometheus does not answer:\n{self.log.read_text()[-3000:]}"
        body = json.loads(got[1])
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector of ``expr`` now (an AssertionError if it does not parse)."""
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"] if data["resultType"] == "vector" else []
        return result

    async def until(self, expr: str, *, timeout_s: float = 20.0, what: str = "") -> None:
        """Wait (bounded) until ``expr`` returns series."""
        await wait_until(
            lambda: asyncio.to_thread(self.query, expr),
            timeout_s=timeout_s,
            interval_s=0.2,
            what=what or expr,
        )


@dataclass
class Stack:
    """Worker, Prometheus, and where the test's client serves its metrics."""

    worker: CliProcess
    worker_port: int
    client_port: int
    prometheus: Prometheus
    amqp_url: str
    vhost: str
    initial_page: str
    """The worker's /metrics once ready, before any request."""


def _prometheus_config(vhost: str, worker_port: int, client_port: int) -> dict[str, Any]:
    return {
        "global": {
            "scrape_interval": f"{SCRAPE_S}s",
            "scrape_timeout": f"{SCRAPE_S}s",
            "evaluation_interval": f"{SCRAPE_S}s",
        },
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": WORKER_JOB,
                "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"]}],
            },
            {
                "job_name": "amqp-agents-client",
                "static_configs": [{"targets": [f"127.0.0.1:{client_port}"]}],
            },
            {
                "job_name": "rabbitmq",
                "metrics_path": "/metrics/detailed",
                "params": {
                    "family": ["queue_coarse_metrics", "queue_consumer_count"],
                    "vhost": [vhost],
                },
                "static_configs": [{"targets": [f"127.0.0.1:{RABBITMQ_METRICS_PORT}"]}],
            },
        ],
    }


@pytest.fixture(scope="module")
def stack(
    broker_url: str, module_vhost: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A ready worker in the module's vhost and a Prometheus scraping it and RabbitMQ."""
    prometheus_bin = _tool("prometheus")
    if (
        _http(
            f"http://127.0.0.1:{RABBITMQ_METRICS_PORT}/metrics/detailed?family=queue_consumer_count"
        )
        is None
    ):
        pytest.fail(
            "RabbitMQ's rabbitmq_prometheus plugin does not answer on port "
            f"{RABBITMQ_METRICS_PORT}: `rabbitmq-plugins enable rabbitmq_prometheus` "
            "(scripts/broker does it)",
            pytrace=False,
        )
    tmp = tmp_path_factory.mktemp("prometheus")
    amqp_url = url_for_vhost(broker_url, module_vhost)
    worker_port, client_port, prometheus_port = free_port(), free_port(), free_port()
    worker = CliProcess(
        ["run", "amqp_agents.examples.tasks:app", "--metrics-port", str(worker_port)],
        env=cli_env(AMQP_URL=amqp_url, AMQP_AGENTS_METRICS__DEPTH_INTERVAL_S="1"),
        log_dir=tmp,
    )
    prometheus: subprocess.Popen[bytes] | None = None
    log = tmp / "prometheus.log"
    try:
        ready = f"http://127.0.0.1:{worker_port}/readyz"
        wait_until_sync(
            lambda: worker.running() and (_http(ready) or (0, ""))[0] == 200,
            timeout_s=20,
            what="the worker's /readyz 200",
        )
        page = _http(f"http://127.0.0.1:{worker_port}/metrics")
        assert page is not None
        config = tmp / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(_prometheus_config(module_vhost, worker_port, client_port))
        )
        with log.open("wb") as out:
            prometheus = subprocess.Popen(
                [
                    prometheus_bin,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address=127.0.0.1:{prometheus_port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        server = Prometheus(prometheus_port, prometheus, log)

        def prometheus_ready() -> bool:
            assert prometheus is not None
            if prometheus.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{log.read_text()[-3000:]}")
            got = _http(f"http://127.0.0.1:{prometheus_port}/-/ready")
            return got is not None and got[0] == 200

        wait_until_sync(prometheus_ready, timeout_s=30, what="Prometheus /-/ready")
        # Prometheus applies its targets up to 5 s after it starts.
        wait_until_sync(
            lambda: len(server.query('up{job=~"amqp-agents-worker|rabbitmq"} == 1')) == 2,
            timeout_s=30,
            what="the worker and RabbitMQ scraped",
        )
        yield Stack(worker, worker_port, client_port, server, amqp_url, module_vhost, page[1])
    finally:
        if prometheus is not None:
            prometheus.send_signal(signal.SIGTERM)
            try:
                prometheus.wait(timeout=10)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.wait(timeout=10)
        worker.close()


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[RpcClient]:
    """An RPC client whose metrics Prometheus scrapes (job amqp-agents-client)."""
    metrics = Metrics()
    server = HealthServer(
        {"/metrics": lambda: ProbeResult(200, metrics.exposition(), CONTENT_TYPE)},
        host="127.0.0.1",
        port=stack.client_port,
    )
    await server.start()
    transport = RabbitTransport(ConnectionSettings.model_validate({"url": stack.amqp_url}))
    await transport.connect()
    try:
        async with RpcClient(transport, metrics=metrics) as rpc:
            yield rpc
    finally:
        await transport.aclose()
        await server.aclose()


async def _mixed_traffic(rpc: RpcClient, rounds: int) -> int:
    """Successes, callers' mistakes and events (task_add emits task.created); the count."""
    sent = 0
    for index in range(rounds):
        calls = [
            rpc.send("task_manager", "task_add", {"title": f"task {index}"}),
            rpc.send("task_manager", "task_list"),
            rpc.send("task_manager", "task_get", {"id": 10_000 + index}),  # NOT_FOUND
            rpc.send("task_manager", "task_add", {"title": ""}),  # INVALID_PAYLOAD
            rpc.send("task_manager", "no_such_action"),  # UNKNOWN_ACTION
            rpc.send("audit", "audit_log"),
        ]
        await asyncio.gather(*calls)
        sent += len(calls)
    return sent


def _grafana(expr: str) -> str:
    """``expr`` with Grafana's variables replaced (``$name`` and ``${name}``)."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: GRAFANA[m[1]], expr)


def _dashboard_targets() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        if panel.get("type") != "row"
        for target in panel["targets"]
    ]


def _rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in rules["groups"] for rule in group["rules"]]


def _selectors(expr: str) -> set[str]:
    """Every series selector (``name{matchers}``) of ``expr``."""
    return {f"{m[1]}{m[2] or ''}" for m in _SELECTOR.finditer(expr)}


async def test_dashboard_and_rules_return_real_series(stack: Stack, client: RpcClient) -> None:
    """Every dashboard query returns series, every rule parses and evaluates without error,
    and every series selector in the rules matches real series."""
    prometheus = stack.prometheus
    sent = await _mixed_traffic(client, rounds=20)
    # Wait for the scrapes that saw the load (client, worker, RabbitMQ's stats, which
    # RabbitMQ refreshes every 5 s).
    await prometheus.until(
        f'sum(amqp_agents_rpc_calls_total{{job="amqp-agents-client"}}) >= {sent}',
        what="the client's calls scraped",
    )
    await prometheus.until(
        f'sum(amqp_agents_messages_received_total{{job="{WORKER_JOB}"}}) >= {sent}',
        what="the worker's deliveries scraped",
    )
    await prometheus.until(
        'rabbitmq_detailed_queue_consumers{queue="agents.task_manager"} == 1',
        what="RabbitMQ's consumer count scraped",
    )
    await prometheus.until('amqp_agents_events_consumed_total{outcome="ok"} > 0')
    # rate() over the rate interval needs samples spread over it.
    window = GRAFANA["__rate_interval"]
    for job in (WORKER_JOB, "amqp-agents-client", "rabbitmq"):
        await prometheus.until(f'count_over_time(up{{job="{job}"}}[{window}]) >= 5')

    empty: list[str] = []
    for title, expr in _dashboard_targets():
        result = await asyncio.to_thread(prometheus.query, _grafana(expr))
        if not result and not any(name in expr for name in NOT_SET_HERE):
            empty.append(f"{title}: {expr}")
    assert empty == [], "dashboard queries without data:\n" + "\n".join(empty)

    for name in ("agent", "queue"):
        variable = next(
            v for v in json.loads(DASHBOARD.read_text())["templating"]["list"] if v["name"] == name
        )
        found = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
        assert found, variable["definition"]
        values = await asyncio.to_thread(
            prometheus.api, f"label/{found[2]}/values", **{"match[]": found[1]}
        )
        assert values, f"${name} would offer nothing"

    unmatched: list[str] = []
    for rule in _rules():
        await asyncio.to_thread(prometheus.query, rule["expr"])  # parses and evaluates
        for selector in sorted(_selectors(rule["expr"])):
            if selector.split("{")[0] in NOT_SET_HERE:
                continue
            if not await asyncio.to_thread(prometheus.query, selector):
                unmatched.append(f"{rule['alert']}: {selector}")
    assert unmatched == [], "rule selectors that match no real series"

    # Prometheus itself evaluates every rule, without error, and none fires: a healthy
    # worker answering callers' mistakes (NOT_FOUND, INVALID_PAYLOAD, UNKNOWN_ACTION).
    async def evaluated_rules() -> dict[str, dict[str, Any]]:
        groups = (await asyncio.to_thread(prometheus.api, "rules"))["groups"]
        rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
        return rules if all(rule["health"] != "unknown" for rule in rules.values()) else {}

    evaluated = await wait_until(
        evaluated_rules, timeout_s=20, interval_s=0.2, what="every rule evaluated"
    )
    assert set(evaluated) == {rule["alert"] for rule in _rules()}
    assert {
        name: rule.get("lastError") for name, rule in evaluated.items() if rule["health"] != "ok"
    } == {}
    alerts = (await asyncio.to_thread(prometheus.api, "alerts"))["alerts"]
    assert [alert["labels"] for alert in alerts] == []


async def test_the_worker_starts_with_every_label_set_it_later_uses(
    stack: Stack, client: RpcClient
) -> None:
    """Counters and histograms the worker fills under load all existed (at 0) at start."""
    await _mixed_traffic(client, rounds=3)
    got = _http(f"http://127.0.0.1:{stack.worker_port}/metrics")
    assert got is not None

    def label_sets(page: str) -> set[tuple[str, frozenset[tuple[str, str]]]]:
        return {
            (sample.name, frozenset(sample.labels.items()))
            for family in text_string_to_metric_families(page)
            if family.type in ("counter", "histogram")
            for sample in family.samples
            if sample.labels
        }

    after, before = label_sets(got[1]), label_sets(stack.initial_page)
    assert any(name == "amqp_agents_error_replies_total" for name, _ in after)
    assert sorted(after - before, key=str) == []


async def test_sigkill_is_what_the_rule_tests_assume(
    stack: Stack, broker_admin: BrokerAdmin
) -> None:
    """After a SIGKILL: up is 0, the worker's series are stale (gone), RabbitMQ reports 0
    consumers (the series stays), so the consumers and workers panels show a red 0 instead
    of "No data". A deleted queue's RabbitMQ series disappear. Runs last: it kills the
    worker."""
    prometheus = stack.prometheus
    await prometheus.until(f'up{{job="{WORKER_JOB}"}} == 1')
    killed_at = time.monotonic()
    stack.worker.proc.send_signal(signal.SIGKILL)
    stack.worker.proc.wait(timeout=10)
    await prometheus.until(f'up{{job="{WORKER_JOB}"}} == 0', what="up 0 after the kill")
    assert (
        await asyncio.to_thread(
            prometheus.query, f'amqp_agents_queue_consumers{{job="{WORKER_JOB}"}}'
        )
        == []
    )
    await prometheus.until(
        'rabbitmq_detailed_queue_consumers{queue="agents.task_manager"} == 0',
        what="RabbitMQ's count of 0 consumers",
    )
    seen_s = time.monotonic() - killed_at
    consumers_panel, workers_panel = (
        expr
        for title, expr in _dashboard_targets()
        if title in ("Consumers per work queue", "Workers answering scrapes")
    )
    consumers = {
        row["metric"]["queue"]: float(row["value"][1])
        for row in await asyncio.to_thread(prometheus.query, _grafana(consumers_panel))
    }
    assert consumers.get("agents.task_manager") == 0, consumers
    workers = await asyncio.to_thread(prometheus.query, _grafana(workers_panel))
    assert [float(row["value"][1]) for row in workers] == [0]
    # The rule's condition needs half of a 2-minute window (alerts.test.yml times it);
    # here: its input is there within seconds, not minutes.
    assert seen_s < 20, seen_s

    await broker_admin.arun("delete_queue", "-p", stack.vhost, "agents.audit")

    async def series_gone() -> bool:
        consumers = 'rabbitmq_detailed_queue_consumers{queue="agents.audit"}'
        return not await asyncio.to_thread(prometheus.query, consumers)

    await wait_until(
        series_gone, timeout_s=20, interval_s=0.2, what="the deleted queue's series to go"
    )
