"""Flow control: a real broker memory alarm (``connection.blocked``).

The test sets the broker's memory watermark to 0, which sounds the alarm at once and
blocks every publishing connection, and always puts the old watermark back. While
blocked: publishes fail within their bound saying the message was not sent, the
worker is not ready (but alive: restarting would not clear the alarm), the gauge
says 1, and consuming goes on. After the alarm: everything flows again.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from amqp_agents.config import ConnectionSettings, WorkerSettings
from amqp_agents.errors import PublishTimeoutError
from amqp_agents.events.bus import EventBus
from amqp_agents.metrics import Metrics
from amqp_agents.runtime.agent import Agent, action
from amqp_agents.runtime.worker import Worker
from amqp_agents.testing import BrokerAdmin
from amqp_agents.transport.rabbitmq import RabbitTransport
from tests.support import wait_until

pytestmark = pytest.mark.slow


class Echo(Agent):
    @action("echo")
    async def echo(self, payload: dict[str, Any]) -> dict[str, Any]:
        return payload


@pytest.fixture
async def memory_alarm(broker_admin: BrokerAdmin) -> AsyncIterator[BrokerAdmin]:
    """Yields; the test sounds the alarm with :func:`sound`. The watermark is always
    restored, even when the test fails."""
    before = (
        await broker_admin.arun("eval", "vm_memory_monitor:get_vm_memory_high_watermark().")
    ).strip()
    if float(before) <= 0:  # a plain fraction, e.g. 0.4
        # Another run's alarm is sounding right now (two suites on one broker): restore
        # the default, never 0, or the broker would stay blocked for everyone.
        before = "0.4"
    try:
        yield broker_admin
    finally:
        await broker_admin.arun("set_vm_memory_high_watermark", before)


async def sound(admin: BrokerAdmin, on: bool, restore_to: str = "0.4") -> None:
    await admin.arun("set_vm_memory_high_watermark", "0" if on else restore_to)


async def test_a_memory_alarm_blocks_publishes_with_a_bound_and_shows_in_readiness(
    amqp_url: str, unique: Any, memory_alarm: BrokerAdmin
) -> None:
    metrics = Metrics()
    worker_transport = RabbitTransport(ConnectionSettings.model_validate({"url": amqp_url}))
    client_transport = RabbitTransport(ConnectionSettings.model_validate({"url": amqp_url}))
    await worker_transport.connect()
    await client_transport.connect()
    agent = Echo(name=unique("echo"))
    worker = Worker(worker_transport, [agent], settings=WorkerSettings(), metrics=metrics)
    bus = EventBus(client_transport, publish_timeout_s=1.0)
    try:
        await worker.start()
        await bus.start()
        assert worker.is_ready
        assert not client_transport.is_blocked

        await sound(memory_alarm, True)
        # The broker blocks a connection when it next publishes: the first publish
        # may be the one that finds out (its outcome is then unknown).
        with pytest.raises(PublishTimeoutError):
            await bus.publish("flow.test", {"n": 1})
        await wait_until(lambda: client_transport.is_blocked, timeout_s=10, what="blocked")
        began = time.monotonic()
        with pytest.raises(PublishTimeoutError, match=r"blocks publishing.*was not sent"):
            await bus.publish("flow.test", {"n": 2})
        assert 0.9 < time.monotonic() - began < 3

        # The worker's publishing connection is blocked once it publishes too.
        await _publish_from(worker_transport)
        await wait_until(lambda: not worker.is_ready, timeout_s=10, what="not ready")
        assert worker.is_blocked
        assert not worker.consumers_lost  # alive: a restart would not help
        assert metrics.registry.get_sample_value("amqp_agents_connection_blocked") == 1.0

        await sound(memory_alarm, False)
        await wait_until(
            lambda: not client_transport.is_blocked and worker.is_ready,
            timeout_s=20,
            what="unblocked and ready again",
        )
        assert await bus.publish("flow.test", {"n": 3})
        assert metrics.registry.get_sample_value("amqp_agents_connection_blocked") == 0.0
    finally:
        await sound(memory_alarm, False)
        await bus.aclose()
        await worker.stop()
        await client_transport.aclose()
        await worker_transport.aclose()


async def _publish_from(transport: RabbitTransport) -> None:
    bus = EventBus(transport, publish_timeout_s=0.5)
    await bus.start()
    try:
        await bus.publish("flow.worker", {})
    except PublishTimeoutError:
        pass  # blocked: that is what this is for
    finally:
        await bus.aclose()
