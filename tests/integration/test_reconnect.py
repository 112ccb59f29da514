"""Reconnects: a worker survives dropped connections and broker restarts.

The broker's own view is the proof: after each fault, the agent queue has its
consumer back (``rabbitmqctl list_queues``), calls are answered again, and the worker
reports the reconnect in its metrics. The broker-restart test always starts the
broker again, even when it fails.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from amqp_agents.testing import BrokerAdmin, url_for_vhost
from tests.agents_for_tests import CliProcess, cli_env, free_port, run_cli
from tests.support import wait_until_sync

APP = "amqp_agents.examples.tasks:app"


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def _consumers(admin: BrokerAdmin, vhost: str, queue: str) -> int:
    row = admin.list_queues(vhost).get(queue)
    return -1 if row is None else row.consumers


@pytest.fixture
def worker(
    broker_url: str, fresh_vhost: str, tmp_path: Path
) -> Iterator[tuple[CliProcess, int, str]]:
    """The example worker as a subprocess on a vhost of its own, with probes."""
    url = url_for_vhost(broker_url, fresh_vhost)
    port = free_port()
    process = CliProcess(
        ["--url", url, "run", APP, "--metrics-port", str(port)],
        env=cli_env(AMQP_AGENTS_METRICS__DEPTH_INTERVAL_S="0.2"),
        log_dir=tmp_path,
    )
    try:
        wait_until_sync(
            lambda: process.running() and _get(port, "/readyz")[0] == 200,
            timeout_s=40,
            what="the worker to be ready",
        )
        yield process, port, url
    finally:
        process.terminate()
        try:
            process.wait(timeout_s=30)
        finally:
            process.close()


def _call_ok(url: str) -> None:
    done = run_cli("--url", url, "call", "task_manager", "task_list", env=cli_env())
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_worker_reattaches_every_consumer_after_its_connections_are_closed(
    worker: tuple[CliProcess, int, str], broker_admin: BrokerAdmin, fresh_vhost: str
) -> None:
    """rabbitmqctl close_connection: the worker reconnects and the broker sees consumers."""
    process, port, url = worker
    _call_ok(url)
    for round_ in (1, 2):
        assert broker_admin.close_connections(fresh_vhost) >= 2
        expected = f"amqp_agents_reconnects_total {float(round_)}"

        def recovered(expected: str = expected) -> bool:
            return (
                process.running()
                and expected in _get(port, "/metrics")[1]
                and all(
                    _consumers(broker_admin, fresh_vhost, queue) == 1
                    for queue in ("agents.task_manager", "agents.audit", "events.audit")
                )
                and _get(port, "/readyz")[0] == 200
            )

        wait_until_sync(recovered, timeout_s=30, what=f"reconnect {round_}, consumers re-attached")
        _call_ok(url)
    assert _get(port, "/healthz")[0] == 200


@pytest.fixture
def restartable_broker(broker_admin: BrokerAdmin) -> Iterator[BrokerAdmin]:
    """The broker admin; the broker is always started again afterwards."""
    try:
        yield broker_admin
    finally:
        broker_admin.run("start_app")
        broker_admin.run("await_startup", "--timeout", "60")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_worker_survives_a_broker_restart(
    worker: tuple[CliProcess, int, str], restartable_broker: BrokerAdmin, fresh_vhost: str
) -> None:
    """stop_app / start_app: readiness drops, then the worker serves again by itself."""
    process, port, url = worker
    _call_ok(url)
    restartable_broker.run("stop_app")
    try:
        wait_until_sync(
            lambda: _get(port, "/readyz")[0] == 503, timeout_s=20, what="readiness to drop"
        )
        assert process.running()
        assert _get(port, "/healthz")[0] == 200  # alive: it is reconnecting, not stuck
    finally:
        restartable_broker.run("start_app")
        restartable_broker.run("await_startup", "--timeout", "60")
    wait_until_sync(
        lambda: process.running() and _get(port, "/readyz")[0] == 200,
        timeout_s=60,
        what="the worker to serve again",
    )
    assert _consumers(restartable_broker, fresh_vhost, "agents.task_manager") == 1
    _call_ok(url)
