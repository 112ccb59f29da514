"""The two backends every contract test runs on, and the toolkit the tests share.

Each test gets ``backend``: *a broker* of its own and a way to open connections to it.

* ``rabbitmq`` (marked ``integration``): the module's vhost on the real broker, with
  unique names per test; losing a connection closes exactly that transport's two AMQP
  connections with ``rabbitmqctl close_connection``, found by the ``connection_name``
  client property (each transport gets a unique ``client_name``).
* ``memory``: a fresh :class:`InMemoryBroker`; losing a connection is
  :meth:`InMemoryTransport.simulate_connection_loss`.

RabbitMQ is the truth: both backends must pass the same assertions.
"""

from __future__ import annotations

import abc
import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import pytest

from amqp_agents.config import ConnectionSettings
from amqp_agents.models.envelope import Envelope
from amqp_agents.testing import BrokerAdmin, url_for_vhost
from amqp_agents.transport.base import (
    ConsumerHandle,
    Delivery,
    EndCallback,
    QueueSpec,
    Transport,
)
from amqp_agents.transport.memory import InMemoryBroker, InMemoryTransport
from amqp_agents.transport.rabbitmq import RabbitTransport
from tests.support import wait_until

PUBLISH_TIMEOUT_S = 5.0


# -- consuming -----------------------------------------------------------------------


class Inbox:
    """The deliveries of one consumer, in arrival order."""

    def __init__(self, *, timeout_s: float, quiet_s: float) -> None:
        self._arrived: asyncio.Queue[Delivery] = asyncio.Queue()
        self._timeout_s = timeout_s
        self._quiet_s = quiet_s
        self.consumer: ConsumerHandle | None = None

    async def handler(self, delivery: Delivery) -> None:
        self._arrived.put_nowait(delivery)

    async def next(self) -> Delivery:
        """The next delivery; fails the test if none arrives in time."""
        try:
            return await asyncio.wait_for(self._arrived.get(), self._timeout_s)
        except TimeoutError:
            pass
        pytest.fail(f"no delivery within {self._timeout_s:g}s")

    async def take(self, count: int) -> list[Delivery]:
        """The next ``count`` deliveries."""
        return [await self.next() for _ in range(count)]

    async def expect_nothing(self) -> None:
        """Nothing more arrives (use after a positive control proved delivery works)."""
        try:
            delivery = await asyncio.wait_for(self._arrived.get(), self._quiet_s)
        except TimeoutError:
            return
        pytest.fail(f"unexpected delivery: {delivery.envelope.body!r}")

    async def close(self) -> None:
        """Close the consumer (its unsettled deliveries return to the queue)."""
        assert self.consumer is not None
        await self.consumer.close()


def bodies(deliveries: Sequence[Delivery]) -> list[bytes]:
    return [d.envelope.body for d in deliveries]


# -- the backends --------------------------------------------------------------------


class Backend(abc.ABC):
    """A broker of the test's own, connections to it, and the helpers tests share."""

    name: str
    timeout_s: float
    """How long a test waits for something that must happen."""
    quiet_s: float
    """How long an absence check waits after a positive control proved delivery works."""

    @abc.abstractmethod
    def new_transport(self) -> Transport:
        """A transport that is not connected yet (closed after the test)."""

    @abc.abstractmethod
    async def lose_connection(self, transport: Transport) -> None:
        """Drop the transport's link like a network failure; return once it noticed."""

    @abc.abstractmethod
    def reconnecting_transport(self) -> Transport:
        """A transport (not connected yet) that comes back by itself after a loss."""

    @abc.abstractmethod
    async def come_back(self, transport: Transport) -> None:
        """After :meth:`lose_connection` of a reconnecting transport: let it reconnect
        and return once its owners' state is restored."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close every transport opened."""

    async def connect(self) -> Transport:
        """A connected transport (closed after the test)."""
        transport = self.new_transport()
        await transport.connect()
        return transport

    @staticmethod
    def unique(prefix: str) -> str:
        return f"contract-{prefix}-{uuid.uuid4().hex[:8]}"

    async def queue(self, transport: Transport, prefix: str = "q", **options: Any) -> str:
        """Declare a queue with a unique name; ``options`` go to :class:`QueueSpec`."""
        return await transport.declare_queue(QueueSpec(name=self.unique(prefix), **options))

    async def consume(
        self,
        transport: Transport,
        queue: str,
        *,
        prefetch: int = 10,
        no_ack: bool = False,
        on_end: EndCallback | None = None,
    ) -> Inbox:
        inbox = Inbox(timeout_s=self.timeout_s, quiet_s=self.quiet_s)
        inbox.consumer = await transport.consume(
            queue, inbox.handler, prefetch=prefetch, no_ack=no_ack, on_end=on_end
        )
        return inbox

    @abc.abstractmethod
    async def operator_deletes_queue(self, queue: str) -> None:
        """Delete a queue as an operator does (any owner, exclusive ones too)."""

    @abc.abstractmethod
    async def operator_deletes_exchange(self, exchange: str) -> None:
        """Delete an exchange (and its bindings) behind the library's back."""

    @abc.abstractmethod
    async def close_consumer_channel(self, transport: Transport, consumer: ConsumerHandle) -> None:
        """Make the broker close a consumer's channel with an error (406)."""

    @staticmethod
    async def publish(
        transport: Transport,
        body: bytes,
        *,
        exchange: str = "",
        routing_key: str,
        mandatory: bool = False,
        **properties: Any,
    ) -> None:
        envelope = Envelope(body=body, exchange=exchange, routing_key=routing_key, **properties)
        await transport.publish(envelope, mandatory=mandatory, timeout_s=PUBLISH_TIMEOUT_S)

    async def wait_until(self, predicate: Callable[[], object], what: str) -> None:
        """:func:`tests.support.wait_until`, bounded by this backend's :attr:`timeout_s`."""
        await wait_until(predicate, what=what, timeout_s=self.timeout_s)

    async def ready(self, transport: Transport, queue: str) -> int:
        """Ready messages in ``queue``."""
        return (await transport.queue_info(queue)).messages


class RabbitBackend(Backend):
    """The module's vhost on the real broker."""

    name = "rabbitmq"
    timeout_s = 5.0
    quiet_s = 0.3

    def __init__(self, url: str, admin: BrokerAdmin) -> None:
        self._url = url
        self._admin = admin
        self._opened: list[RabbitTransport] = []
        self._reconnects: dict[RabbitTransport, int] = {}

    def new_transport(self, *, reconnect: bool = False) -> RabbitTransport:
        # Not reconnecting by default, like the in-memory transport: a lost
        # connection stays lost unless a test asks for a reconnecting one.
        settings = ConnectionSettings.model_validate(
            {
                "url": self._url,
                "client_name": self.unique("client"),
                "reconnect": reconnect,
                "reconnect_initial_s": 0.05,
            }
        )
        transport = RabbitTransport(settings)
        self._opened.append(transport)
        return transport

    def reconnecting_transport(self) -> RabbitTransport:
        return self.new_transport(reconnect=True)

    async def come_back(self, transport: Transport) -> None:
        assert isinstance(transport, RabbitTransport)
        before = self._reconnects.get(transport, 0)

        async def restored() -> bool:
            # Counted once every owner's restore callback has run.
            return transport.reconnects > before

        await self.wait_until(restored, "the transport reconnected and restored its owners")

    async def lose_connection(self, transport: Transport) -> None:
        assert isinstance(transport, RabbitTransport)
        lost = asyncio.Event()
        transport.on_connection_lost(lambda _reason: lost.set())
        self._reconnects[transport] = transport.reconnects
        marker = f'"{transport.settings.client_name}/'
        listing = await self._admin.arun(
            "list_connections", "--no-table-headers", "pid", "client_properties"
        )
        pids = [line.split("\t")[0] for line in listing.splitlines() if marker in line]
        assert len(pids) == 2, f"expected the consume and publish connections, got {pids}"
        for pid in pids:
            await self._admin.arun("close_connection", pid, "contract test: connection lost")
        await asyncio.wait_for(lost.wait(), self.timeout_s)

    async def operator_deletes_queue(self, queue: str) -> None:
        vhost = unquote(urlsplit(self._url).path[1:])
        await self._admin.arun("delete_queue", "-p", vhost, queue)

    async def operator_deletes_exchange(self, exchange: str) -> None:
        connection = await aio_pika.connect(self._url)
        try:
            channel = await connection.channel()
            await channel.exchange_delete(exchange)
        finally:
            await connection.close()

    async def close_consumer_channel(self, transport: Transport, consumer: ConsumerHandle) -> None:
        # An ack of a delivery tag the channel never had: RabbitMQ closes the channel
        # with 406 PRECONDITION_FAILED ("unknown delivery tag").
        underlay = getattr(consumer, "underlay", None)
        assert underlay is not None, f"not a RabbitMQ consumer: {consumer!r}"
        await underlay.basic_ack(2**40)

    async def aclose(self) -> None:
        for transport in self._opened:
            await transport.aclose()


class MemoryBackend(Backend):
    """A fresh in-memory broker."""

    name = "memory"
    timeout_s = 1.0  # everything happens in-process: this is plenty
    quiet_s = 0.05

    def __init__(self) -> None:
        self.broker = InMemoryBroker()
        self._opened: list[InMemoryTransport] = []
        self._reconnecting: list[InMemoryTransport] = []

    def new_transport(self) -> InMemoryTransport:
        transport = InMemoryTransport(self.broker)
        self._opened.append(transport)
        return transport

    async def lose_connection(self, transport: Transport) -> None:
        assert isinstance(transport, InMemoryTransport)
        lost = asyncio.Event()
        transport.on_connection_lost(lambda _reason: lost.set())
        transport.simulate_connection_loss(will_reconnect=transport in self._reconnecting)
        await asyncio.wait_for(lost.wait(), self.timeout_s)

    def reconnecting_transport(self) -> InMemoryTransport:
        transport = self.new_transport()
        self._reconnecting.append(transport)
        return transport

    async def come_back(self, transport: Transport) -> None:
        assert isinstance(transport, InMemoryTransport)
        await transport.simulate_reconnect()

    async def operator_deletes_queue(self, queue: str) -> None:
        self.broker.delete_queue(queue)

    async def operator_deletes_exchange(self, exchange: str) -> None:
        self.broker.delete_exchange(exchange)

    async def close_consumer_channel(self, transport: Transport, consumer: ConsumerHandle) -> None:
        assert isinstance(transport, InMemoryTransport)
        transport.simulate_channel_close(consumer, code=406, text="PRECONDITION_FAILED")

    async def aclose(self) -> None:
        for transport in self._opened:
            await transport.aclose()


@pytest.fixture(params=[pytest.param("rabbitmq", marks=pytest.mark.integration), "memory"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """A broker for this test: the module's vhost on RabbitMQ, or a fresh in-memory one."""
    chosen: Backend
    if request.param == "rabbitmq":
        url = url_for_vhost(
            request.getfixturevalue("broker_url"), request.getfixturevalue("module_vhost")
        )
        chosen = RabbitBackend(url, request.getfixturevalue("broker_admin"))
    else:
        chosen = MemoryBackend()
    try:
        yield chosen
    finally:
        await chosen.aclose()


@pytest.fixture
async def transport(backend: Backend) -> Transport:
    """A connected transport to the test's broker."""
    return await backend.connect()
