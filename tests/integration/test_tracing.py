"""A service without this library joins a trace through the ``traceparent`` header."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import aio_pika
import pytest
from opentelemetry.trace import SpanKind

from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.agent import Agent, action
from amqp_agents.runtime.worker import Worker
from amqp_agents.tracing import Tracing
from tests.spans import Spans, parent_of

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture
def spans() -> Iterator[Spans]:
    recorded = Spans()
    yield recorded
    recorded.shutdown()


class Echo(Agent):
    @action("echo")
    async def echo(self, payload: dict[str, Any]) -> dict[str, Any]:
        return payload


async def test_a_plain_amqp_request_with_traceparent_is_processed_in_its_trace(
    connect: Any, amqp_url: str, unique: Any, spans: Spans
) -> None:
    agent = unique("traced")
    worker = Worker(
        await connect(), [Echo(name=agent)], tracing=Tracing(tracer_provider=spans.provider)
    )
    await worker.start()
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        replies = await channel.declare_queue("", exclusive=True)
        exchange = await channel.get_exchange("agents")
        correlation_id = uuid.uuid4().hex
        await exchange.publish(
            aio_pika.Message(
                body=json.dumps({"n": 3}).encode(),
                content_type="application/json",
                type="echo",
                message_id=correlation_id,
                correlation_id=correlation_id,
                reply_to=replies.name,
                headers={
                    "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01",
                    "tracestate": "vendor=value",
                },
            ),
            routing_key=agent,
            mandatory=True,
        )
        async with replies.iterator() as messages:
            async for message in messages:
                reply = message
                break
        found = await spans.named(f"process agents:{agent}:agents.{agent}", "send")
    finally:
        await connection.close()
        await worker.stop()

    process = found[f"process agents:{agent}:agents.{agent}"]
    assert process.kind is SpanKind.CONSUMER
    assert process.context is not None
    assert process.parent is not None
    assert f"{process.context.trace_id:032x}" == TRACE_ID
    assert f"{process.parent.span_id:016x}" == PARENT_ID
    assert process.parent.is_remote
    assert process.context.trace_state.get("vendor") == "value"
    assert (process.attributes or {})["messaging.message.conversation_id"] == correlation_id
    # The reply carries the trace on, for the caller to link or continue.
    send = found["send"]
    assert parent_of(send) == process.context.span_id
    headers = reply.headers or {}
    traceparent = headers["traceparent"]
    if isinstance(traceparent, bytes):
        traceparent = traceparent.decode()
    assert traceparent == f"00-{TRACE_ID}-{send.context.span_id:016x}-01"
    assert json.loads(reply.body) == {"ok": True, "data": {"n": 3}}


async def test_a_call_from_this_library_carries_traceparent_a_plain_consumer_can_read(
    connect: Any, amqp_url: str, unique: Any, spans: Spans
) -> None:
    agent = unique("plain")
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            "agents", aio_pika.ExchangeType.DIRECT, durable=True
        )
        queue = await channel.declare_queue(  # exclusive: 4.x refuses transient shared ones
            f"agents.{agent}", exclusive=True, arguments={"x-max-priority": 9}
        )
        await queue.bind(exchange, agent)
        async with RpcClient(
            await connect(), tracing=Tracing(tracer_provider=spans.provider)
        ) as client:
            await client.notify(agent, "work", {"n": 4})
        message = await queue.get(timeout=5)
        await message.ack()
        (send,) = await spans.wait_for(lambda s: len(s) == 1)
    finally:
        await connection.close()
    assert send.context is not None
    traceparent = (message.headers or {})["traceparent"]
    if isinstance(traceparent, bytes):
        traceparent = traceparent.decode()
    flags = int(send.context.trace_flags)
    assert traceparent == f"00-{send.context.trace_id:032x}-{send.context.span_id:016x}-{flags:02x}"
