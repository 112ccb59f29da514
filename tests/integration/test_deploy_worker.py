"""The worker started exactly as the Kubernetes Deployment starts it, on the local broker.

Command, arguments and environment are read from ``deploy/k8s``: the image's ``ENV``,
then the ConfigMap (``envFrom``), then the container's ``env`` (the Secret's
``AMQP_URL`` through ``secretKeyRef``, the pod name through ``fieldRef``), in the order
Kubernetes applies them. Three things differ, all on purpose: ``AMQP_URL`` points at a
throw-away vhost of the local RabbitMQ instead of the example Secret's fake broker,
``TASKS_STORE_URL`` at the local Redis (with a key prefix of the test's own) instead of
the kit's Redis Service, and the metrics port is a free one instead of 9100, so parallel
runs and a node exporter on the machine cannot collide (the unit tests check that the
manifests say 9100 everywhere).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from redis import Redis

from amqp_agents.models.topology import Topology
from amqp_agents.testing import BrokerAdmin, url_for_vhost
from tests.agents_for_tests import CLI, CliProcess, cli_env, free_port, run_cli
from tests.deploy_kit import (
    EXAMPLE_APP,
    METRICS_PORT,
    configmap_env,
    dockerfile_env,
    manifest,
    secret_env,
    worker_container,
)
from tests.support import wait_until_sync


def http_status(port: int, path: str) -> tuple[int, str] | None:
    """(status, body) of ``GET path`` on the worker's port; ``None`` while nothing listens."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def deployment_env(
    amqp_url: str, pod_name: str, *, store_url: str, key_prefix: str
) -> dict[str, str]:
    """The container's environment as Kubernetes builds it, with ``amqp_url`` as AMQP_URL
    and ``store_url`` as the example app's TASKS_STORE_URL."""
    container = worker_container()
    env = cli_env(pythonpath=False)  # PATH, HOME...; no AMQP_* of the developer or CI
    env.update(dockerfile_env())
    for source in container["envFrom"]:
        assert source["configMapRef"]["name"] == manifest("ConfigMap")["metadata"]["name"]
        env.update(configmap_env())
    secret = {**secret_env(), "AMQP_URL": amqp_url}
    for entry in container["env"]:
        if entry["name"] == "TASKS_STORE_URL":
            assert entry["value"].startswith("redis://")
            env.update(TASKS_STORE_URL=store_url, TASKS_KEY_PREFIX=key_prefix)
            continue
        if "value" in entry:
            env[entry["name"]] = entry["value"]
            continue
        ref = entry["valueFrom"]
        if "secretKeyRef" in ref:
            assert ref["secretKeyRef"]["name"] == manifest("Secret")["metadata"]["name"]
            env[entry["name"]] = secret[ref["secretKeyRef"]["key"]]
        elif ref.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[entry["name"]] = pod_name
        else:
            raise AssertionError(f"no stand-in for {entry}")
    return env


def deployment_args(port: int) -> list[str]:
    """The container's args, with the metrics port swapped for ``port``."""
    args = list(worker_container()["args"])
    at = args.index("--metrics-port") + 1
    assert args[at] == str(METRICS_PORT)
    args[at] = str(port)
    return args


def connection_names(admin: BrokerAdmin, vhost: str) -> str:
    """The client properties of every connection to ``vhost`` (rabbitmqctl's text)."""
    out = admin.run("list_connections", "--no-table-headers", "vhost", "client_properties")
    return "\n".join(line for line in out.splitlines() if line.startswith(f"{vhost}\t"))


def test_worker_runs_as_the_deployment_says_answers_and_stops_on_sigterm(
    broker_url: str,
    broker_admin: BrokerAdmin,
    fresh_vhost: str,
    redis_url: str,
    redis_prefix: str,
    tmp_path: Path,
) -> None:
    """Deployment command + args + env: /readyz 200, /healthz and /metrics served, the
    scaled queue consumed, a call answered; SIGTERM -> exit 0 within the grace period."""
    container = worker_container()
    assert container["command"] == ["amqp-agents"]
    assert Path(CLI).name == "amqp-agents"  # the same console script, from .venv
    pod_name = f"amqp-agents-worker-{uuid.uuid4().hex[:8]}"
    env = deployment_env(
        url_for_vhost(broker_url, fresh_vhost),
        pod_name,
        store_url=redis_url,
        key_prefix=redis_prefix,
    )
    grace_s = float(env["AMQP_AGENTS_WORKER__GRACE_PERIOD_S"])
    port = free_port()
    args = deployment_args(port)
    assert EXAMPLE_APP in args

    worker = CliProcess(args, env=env, log_dir=tmp_path)
    try:

        def ready() -> bool:
            worker.running()
            return http_status(port, "/readyz") == (200, "ready\n")

        wait_until_sync(ready, timeout_s=30, what="/readyz 200 from the worker")
        assert http_status(port, "/healthz") == (200, "ok\n")
        metrics = http_status(port, "/metrics")
        assert metrics is not None
        assert metrics[0] == 200
        # The ConfigMap's concurrency is the one in force.
        concurrency = float(env["AMQP_AGENTS_WORKER__CONCURRENCY"])
        assert f"amqp_agents_concurrency_limit {concurrency}" in metrics[1]

        # The queue KEDA scales on exists and this worker consumes it.
        queue = manifest("ScaledObject")["spec"]["triggers"][0]["metadata"]["queueName"]
        assert queue == Topology().agent_queue("task_manager")

        # (A quorum queue, as the ConfigMap asks: the broker updates its consumer count
        # on a periodic tick, so the count can lag the consume by a few seconds.)
        def consumed() -> bool:
            rows = broker_admin.list_queues(fresh_vhost)
            return queue in rows and rows[queue].consumers == 1

        wait_until_sync(consumed, timeout_s=15, interval_s=0.5, what=f"one consumer of {queue}")
        # The pod's name (fieldRef) names its connections at the broker.
        assert pod_name in connection_names(broker_admin, fresh_vhost)

        done = run_cli("call", "task_manager", "task_add", '{"title": "deployed"}', env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        reply: dict[str, Any] = json.loads(done.stdout)
        assert reply["ok"] is True, reply
        assert reply["data"]["title"] == "deployed"
        task_id = reply["data"]["id"]
        assert str(uuid.UUID(task_id)) == task_id
        # The Deployment's TASKS_STORE_URL is in force: the task is in Redis.
        with Redis.from_url(redis_url) as store:
            assert store.exists(f"{redis_prefix}task:{task_id}") == 1

        started = time.monotonic()
        worker.terminate()
        code = worker.wait(grace_s + 5)
        elapsed = time.monotonic() - started
    finally:
        worker.close()
    assert code == 0, worker.output()
    assert elapsed < grace_s, f"stopped after {elapsed:.1f}s, over the {grace_s:g}s grace period"
    assert http_status(port, "/healthz") is None
    assert broker_admin.list_queues(fresh_vhost)[queue].messages == 0
    # --log-json: one JSON object per line, and the password never in them.
    lines = worker.stderr_path.read_text().splitlines()
    assert lines
    for line in lines:
        assert isinstance(json.loads(line), dict), line
    assert ":guest@" not in worker.output()
