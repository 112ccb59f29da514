"""The envelope: every field survives publish -> deliver on both transports."""

from __future__ import annotations

import dataclasses

import pytest

from amqp_agents.models.envelope import Envelope, HeaderValue
from amqp_agents.transport.base import ExchangeKind, Transport
from tests.contract.conftest import PUBLISH_TIMEOUT_S, Backend

HEADERS: dict[str, HeaderValue] = {
    "text": "héllo wörld",
    "empty": "",
    "small": -5,
    "short": 300,
    "int": -100_000,
    "uint": 3_000_000_000,
    "long": 2**40,
    "yes": True,
    "no": False,
    "nothing": None,
}


async def round_trip(backend: Backend, transport: Transport, envelope: Envelope) -> Envelope:
    """Publish ``envelope`` through a topic exchange and return it as delivered."""
    exchange = backend.unique("topic")
    await transport.declare_exchange(exchange, ExchangeKind.TOPIC, durable=False)
    queue = await backend.queue(transport, arguments={"x-max-priority": 9})
    await transport.bind_queue(queue, exchange, "orders.#")
    sent = dataclasses.replace(envelope, exchange=exchange)
    await transport.publish(sent, mandatory=True, timeout_s=PUBLISH_TIMEOUT_S)
    delivery = await (await backend.consume(transport, queue)).next()
    await delivery.ack()
    received = delivery.envelope
    assert (received.exchange, received.routing_key) == (exchange, envelope.routing_key)
    return received


@pytest.mark.parametrize("persistent", [True, False])
async def test_every_envelope_field_survives_a_round_trip(
    backend: Backend, transport: Transport, persistent: bool
) -> None:
    """Properties, headers, exchange and the published (not bound) key arrive intact."""
    sent = Envelope(
        body=b"\x00binary\xffbody",
        routing_key="orders.eu.created",
        content_type="application/json",
        type="order.created",
        message_id="msg-1",
        correlation_id="corr-1",
        reply_to="amq.gen-replies",
        priority=7,
        expiration_ms=60_000,
        timestamp=1_700_000_123,
        headers=HEADERS,
        persistent=persistent,
    )
    received = await round_trip(backend, transport, sent)
    expected = dataclasses.replace(sent, exchange=received.exchange)
    assert received == expected
    assert received.redelivered is False


async def test_a_minimal_envelope_arrives_with_its_defaults(
    backend: Backend, transport: Transport
) -> None:
    """Unset properties stay unset (None), the body may be empty, persistent by default."""
    sent = Envelope(body=b"", routing_key="orders.x")
    received = await round_trip(backend, transport, sent)
    expected = dataclasses.replace(sent, exchange=received.exchange, message_id=received.message_id)
    assert received == expected


async def test_an_unset_message_id_is_filled_in(backend: Backend, transport: Transport) -> None:
    """A message published without message_id arrives with one (returns are keyed on it)."""
    received = await round_trip(backend, transport, Envelope(body=b"x", routing_key="orders.x"))
    assert isinstance(received.message_id, str)
    assert received.message_id


async def test_the_broker_keeps_its_own_copy_of_the_headers(
    backend: Backend, transport: Transport
) -> None:
    """Changing the published envelope's headers afterwards changes nothing delivered."""
    headers: dict[str, HeaderValue] = {"k": "before"}
    queue = await backend.queue(transport)
    envelope = Envelope(body=b"x", routing_key=queue, headers=headers)
    await transport.publish(envelope, timeout_s=PUBLISH_TIMEOUT_S)
    headers["k"] = "after"
    delivery = await (await backend.consume(transport, queue)).next()
    assert delivery.envelope.headers == {"k": "before"}


@pytest.mark.parametrize("value", [pytest.param(b"\x00\xff", id="bytes")])
async def test_header_values_of_every_promised_type_survive(
    backend: Backend, transport: Transport, value: HeaderValue
) -> None:
    """``HeaderValue`` promises bytes round-trip exactly."""
    queue = await backend.queue(transport)
    sent = Envelope(body=b"x", routing_key=queue, headers={"v": value})
    await transport.publish(sent, timeout_s=PUBLISH_TIMEOUT_S)
    delivery = await (await backend.consume(transport, queue)).next()
    assert delivery.envelope.headers == {"v": value}
