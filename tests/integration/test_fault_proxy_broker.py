"""The fault proxy in front of the real broker, driven by aio-pika.

Checks what the fault tests rely on: AMQP works through the proxy (plain and with TLS
terminated by it), a cut is noticed by the client within seconds, and a client gets
back in after a stall (see ``tests.faults`` for what ``resume()`` does).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pytest

from tests.broker_env import broker_address
from tests.faults import FaultProxy, make_tls_material
from tests.support import wait_until

Unique = Callable[[str], str]


def _upstream(broker_url: str) -> tuple[str, int]:
    return broker_address(broker_url)


@pytest.fixture
def proxy(broker_url: str) -> Iterator[FaultProxy]:
    with FaultProxy(*_upstream(broker_url)) as running:
        yield running


async def _roundtrip(connection: aio_pika.abc.AbstractConnection, queue_name: str) -> None:
    """Declare a queue, publish to it, get the message back."""
    channel = await connection.channel()
    queue = await channel.declare_queue(queue_name, durable=True, auto_delete=True)
    body = queue_name.encode()
    await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue_name)
    message = await queue.get(timeout=5)
    assert message is not None
    await message.ack()
    assert message.body == body
    await queue.delete()
    await channel.close()


class _Fired:
    """Registered on an aio-pika callback collection: an event, and what it was called with."""

    def __init__(self, callbacks: Any) -> None:
        self.event = asyncio.Event()
        self.args: tuple[Any, ...] = ()
        callbacks.add(self)

    def __call__(self, *args: Any) -> None:
        self.args = args
        self.event.set()

    async def wait(self, timeout_s: float) -> None:
        await asyncio.wait_for(self.event.wait(), timeout_s)


async def test_amqp_works_through_the_proxy(
    proxy: FaultProxy, module_vhost: str, unique: Unique
) -> None:
    """Declare, publish and get over the proxy, which carried exactly that one connection."""
    connection = await aio_pika.connect(proxy.url(module_vhost), timeout=10)
    try:
        await _roundtrip(connection, unique("via-proxy"))
        assert (proxy.accepted_total, proxy.active_connections) == (1, 1)
    finally:
        await connection.close()


async def test_a_cut_is_noticed_within_two_seconds(
    proxy: FaultProxy, module_vhost: str, unique: Unique
) -> None:
    """cut(): the close callback fires quickly, and a new connection works."""
    connection = await aio_pika.connect(proxy.url(module_vhost), timeout=10)
    try:
        await _roundtrip(connection, unique("before-cut"))
        closed = _Fired(connection.close_callbacks)
        assert proxy.cut() == 1
        await closed.wait(timeout_s=2)
        _, exc = closed.args
        assert isinstance(exc, aiormq.exceptions.AMQPConnectionError)  # not a clean close
        assert not connection.connected.is_set()
    finally:
        await connection.close()

    again = await aio_pika.connect(proxy.url(module_vhost), timeout=10)
    try:
        await _roundtrip(again, unique("after-cut"))
    finally:
        await again.close()


async def test_clients_get_back_in_after_a_stall(
    proxy: FaultProxy, module_vhost: str, unique: Unique
) -> None:
    """A connect hangs while stalled and completes on resume(); a robust connection reconnects.

    resume() resets the robust connection's link (open when the stall began), so it
    reconnects and works again without waiting for a heartbeat timeout.
    """
    robust = await aio_pika.connect_robust(
        proxy.url(module_vhost) + "?reconnect_interval=0.2", timeout=10
    )
    try:
        await _roundtrip(robust, unique("before-stall"))
        reconnected = _Fired(robust.reconnect_callbacks)

        proxy.stall()
        attempt = asyncio.create_task(aio_pika.connect(proxy.url(module_vhost), timeout=10))
        done, _ = await asyncio.wait({attempt}, timeout=0.3)
        assert not done, "a connect completed through a stalled proxy"

        assert proxy.resume() == 1  # the robust connection's old link
        fresh = await asyncio.wait_for(attempt, timeout=10)
        try:
            await _roundtrip(fresh, unique("connected-in-stall"))
        finally:
            await fresh.close()
        await reconnected.wait(timeout_s=10)
        await _roundtrip(robust, unique("after-stall"))
    finally:
        await robust.close()


async def test_amqps_through_the_tls_terminating_proxy(
    broker_url: str, module_vhost: str, unique: Unique, tmp_path: Path
) -> None:
    """amqps://localhost with the test CA works, also after the wrong CA was rejected."""
    tls = make_tls_material(tmp_path)
    with FaultProxy(*_upstream(broker_url), server_ssl=tls.server_context()) as proxy:
        url = proxy.url(module_vhost, scheme="amqps", host="localhost")
        wrong = tls.client_context(ca_file=tls.wrong_ca_file)
        with pytest.raises((ssl.SSLError, aiormq.exceptions.AMQPConnectionError)):
            await aio_pika.connect(url, ssl_context=wrong, timeout=10)

        async def proxy_saw_it() -> bool:
            return proxy.handshake_failures >= 1

        await wait_until(proxy_saw_it, timeout_s=2, what="the proxy to count the bad handshake")

        connection = await aio_pika.connect(url, ssl_context=tls.client_context(), timeout=10)
        try:
            await _roundtrip(connection, unique("via-tls"))
        finally:
            await connection.close()
