"""Failover across broker addresses: several comma-separated URLs (the nodes of a
cluster); connect takes the first that answers, a reconnect moves on from the node it
lost. Two fault proxies in front of the one test broker stand for two nodes."""

from __future__ import annotations

import pytest

from amqp_agents.config import ConnectionSettings
from amqp_agents.errors import BrokerUnavailableError
from amqp_agents.examples.tasks import TaskManager
from amqp_agents.metrics import Metrics
from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.worker import Worker
from amqp_agents.transport.rabbitmq import RabbitTransport
from tests.faults import FaultProxy
from tests.support import wait_until


def _settings(*urls: str) -> ConnectionSettings:
    return ConnectionSettings.model_validate(
        {
            "url": ",".join(urls),
            "connect_timeout_s": 2,
            "publish_timeout_s": 5,
            "reconnect_initial_s": 0.05,
            "reconnect_max_s": 0.5,
        }
    )


def _node(url: str) -> str:
    return url.rpartition("@")[2].partition("/")[0]


async def test_connect_skips_a_node_that_refuses(module_vhost: str) -> None:
    """The first node refuses connections: the transport lands on the second and says
    so (connected_to, password redacted)."""
    with FaultProxy() as down, FaultProxy() as up:
        down.refuse()
        transport = RabbitTransport(_settings(down.url(module_vhost), up.url(module_vhost)))
        await transport.connect()
        try:
            assert transport.connected_to is not None
            assert _node(transport.connected_to) == f"127.0.0.1:{up.port}"
            assert "guest:***@" in transport.connected_to
            assert down.refused_total >= 1
            assert up.active_connections == 2  # consume and publish, both on the one node
        finally:
            await transport.aclose()


async def test_no_node_answering_is_one_clear_error(module_vhost: str) -> None:
    """Every node refuses: BrokerUnavailableError naming each (no password)."""
    with FaultProxy() as first, FaultProxy() as second:
        first.refuse()
        second.refuse()
        transport = RabbitTransport(_settings(first.url(module_vhost), second.url(module_vhost)))
        with pytest.raises(BrokerUnavailableError) as caught:
            await transport.connect()
    text = str(caught.value)
    assert "none of the 2 brokers could be used" in text
    assert f":{first.port}/" in text
    assert f":{second.port}/" in text
    assert ":guest@" not in text


async def test_a_worker_moves_to_the_next_node_when_its_node_goes(module_vhost: str) -> None:
    """The worker's node goes down (connections cut, new ones refused): the worker
    reconnects to the other node (first: it does not try the node it lost again before
    the others), re-attaches, keeps answering, and its broker_connected gauge follows."""
    with FaultProxy() as first, FaultProxy() as second:
        urls = (first.url(module_vhost), second.url(module_vhost))
        worker_transport = RabbitTransport(_settings(*urls))
        client_transport = RabbitTransport(_settings(second.url(module_vhost)))
        metrics = Metrics()
        await worker_transport.connect()
        await client_transport.connect()
        agent = TaskManager(name=f"failover-{first.port}")
        worker = Worker(worker_transport, [agent], metrics=metrics)
        try:
            await worker.start()
            assert _node(worker_transport.connected_to or "") == f"127.0.0.1:{first.port}"
            async with RpcClient(client_transport) as client:
                assert (await client.send(agent.name, "task_add", {"title": "before"})).ok
                first.refuse()
                first.cut()
                await wait_until(
                    lambda: (
                        worker.is_ready
                        and _node(worker_transport.connected_to or "") == f"127.0.0.1:{second.port}"
                    ),
                    timeout_s=15,
                    what="the worker back, on the second node",
                )
                reply = await client.send(agent.name, "task_add", {"title": "after"}, timeout_s=10)
                assert reply.ok, reply
                assert first.refused_total == 0  # the lost node was not tried first
            gauge = {
                sample.labels["broker"]: sample.value
                for family in metrics.registry.collect()
                if family.name == "amqp_agents_broker_connected"
                for sample in family.samples
            }
            assert gauge == {f"127.0.0.1:{second.port}": 1.0}
        finally:
            await worker.stop()
            await client_transport.aclose()
            await worker_transport.aclose()
