"""Refusals that need the real broker: a broker that accepts connections and drops
them at once must not get a reconnect storm; a peer's poison frame must not kill the
connection."""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Awaitable, Callable

import pika

from amqp_agents.config import ConnectionSettings
from amqp_agents.examples.tasks import TaskManager
from amqp_agents.metrics import Metrics
from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.worker import Worker
from amqp_agents.transport.rabbitmq import RabbitTransport
from tests.faults import FaultProxy
from tests.support import wait_until

Connect = Callable[..., Awaitable[RabbitTransport]]


async def test_a_link_that_dies_after_every_reconnect_backs_off(module_vhost: str) -> None:
    """Each restored connection is cut at once: the backoff carries over from one
    reconnect to the next (it does not restart at the first step), so 3 s see a
    handful of reconnects, not dozens."""
    with FaultProxy() as proxy:
        settings = ConnectionSettings.model_validate(
            {
                "url": proxy.url(module_vhost),
                "reconnect_initial_s": 0.05,
                "reconnect_max_s": 1.0,
                "connect_timeout_s": 2,
            }
        )
        transport = RabbitTransport(settings)
        cutting = True

        async def cut_again() -> None:
            if cutting:
                # After this callback returns the transport is "restored"; the cut lands
                # just after, as a broker that drops every new connection would.
                asyncio.get_running_loop().call_soon(proxy.cut)

        transport.on_connection_restored(cut_again)
        await transport.connect()
        try:
            proxy.cut()
            started = time.monotonic()
            await asyncio.sleep(3)  # the duration is the measurement
            cutting = False
            storms = transport.reconnects
            elapsed = time.monotonic() - started
        finally:
            await transport.aclose()
    print(f"\n{storms} reconnects in {elapsed:.1f}s while every connection was cut")
    # Expected delays (full jitter, ceiling 0.05 * 2**n up to 1 s): about 0.7 s of
    # waiting for the first 5 reconnects, then about 0.5 s each: roughly 10 in 3 s.
    # Restarting the backoff each time averages 25 ms a try: over 50.
    assert 2 <= storms <= 20, storms


def _publish_poison(url: str, agent: str) -> None:
    """A request whose AMQP timestamp no datetime can hold (10**15 is read as ms: year
    33658) and whose header carries one too, sent by a plain pika client."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            exchange="agents",
            routing_key=agent,
            body=b'{"title": "poison"}',
            properties=pika.BasicProperties(
                type="task_add",
                timestamp=10**15,
                headers={"x-when": datetime.datetime(9999, 12, 31, tzinfo=datetime.UTC)},
            ),
            mandatory=True,
        )
    finally:
        connection.close()


async def test_a_poison_frame_is_handled_and_the_connection_kept(
    connect: Connect, amqp_url: str, unique: Callable[[str], str]
) -> None:
    """Before: aiormq closed the whole connection on the frame (InvalidFrameError), the
    message was redelivered and killed the next one: a worker reconnected in a loop
    and answered nothing. Now the message is an ordinary request: handled once."""
    agent = TaskManager(name=unique("poison"))
    metrics = Metrics()
    transport = await connect()
    worker = Worker(transport, [agent], metrics=metrics)
    await worker.start()
    errors: list[object] = []
    try:
        async with RpcClient(await connect()) as client:
            stop = asyncio.Event()

            async def steady_load() -> None:  # the other traffic, meanwhile
                while not stop.is_set():
                    reply = await client.send(agent.name, "task_list", {}, timeout_s=5)
                    if reply.error is not None:
                        errors.append(reply.error)

            load = asyncio.create_task(steady_load())
            await asyncio.to_thread(_publish_poison, amqp_url, agent.name)

            async def listed() -> bool:
                tasks = await client.call(agent.name, "task_list", {}, timeout_s=5)
                return any(task["title"] == "poison" for task in tasks["tasks"])

            await wait_until(listed, timeout_s=10, what="the poison request handled")
            stop.set()
            await asyncio.wait_for(load, 10)
    finally:
        await worker.stop()
    assert errors == [], "the other traffic was disturbed"
    assert metrics.registry.get_sample_value("amqp_agents_connection_losses_total") == 0
    assert transport.reconnects == 0
