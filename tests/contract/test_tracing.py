"""OpenTelemetry spans of calls, events and agent hops, the same on both transports."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from amqp_agents.errors import NotFoundError
from amqp_agents.events.bus import EventBus
from amqp_agents.models.messages import Event
from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.agent import Agent, action
from amqp_agents.runtime.worker import Worker
from amqp_agents.tracing import Tracing
from tests.contract.conftest import Backend
from tests.spans import Spans, parent_of, span_id, trace_id

SERVER = {"server.address": "broker.test", "server.port": 5672}


@pytest.fixture
def spans() -> Iterator[Spans]:
    recorded = Spans()
    yield recorded
    recorded.shutdown()


def tracing(spans: Spans) -> Tracing:
    """One service's tracing (each service of a test has its own, on one provider)."""
    return Tracing(tracer_provider=spans.provider, server_address="broker.test", server_port=5672)


class Echo(Agent):
    @action("echo")
    async def echo(self, payload: dict[str, Any]) -> dict[str, Any]:
        if payload.get("missing"):
            raise NotFoundError("no such thing")
        return payload


class Front(Agent):
    """Answers by asking the back agent, from a task of its own."""

    def __init__(self, *, name: str, back: str, client: RpcClient) -> None:
        super().__init__(name=name)
        self.back = back
        self.client = client

    @action("ask")
    async def ask(self, payload: dict[str, Any]) -> Any:
        return await asyncio.create_task(self.client.call(self.back, "echo", payload))


async def test_a_call_is_one_trace_of_client_send_process_settle_spans(
    backend: Backend, spans: Spans
) -> None:
    agent = backend.unique("echo")
    server, caller = await backend.connect(), await backend.connect()
    worker = Worker(server, [Echo(name=agent)], tracing=tracing(spans))
    await worker.start()
    try:
        async with RpcClient(caller, tracing=tracing(spans)) as client:
            assert await client.call(agent, "echo", {"n": 1}) == {"n": 1}
        found = await spans.named(
            f"{agent}/echo",
            f"send agents:{agent}",
            f"process agents:{agent}:agents.{agent}",
            f"ack agents:{agent}:agents.{agent}",
            "send",  # the reply, to the caller's broker-named queue
        )
    finally:
        await worker.stop()
    call = found[f"{agent}/echo"]
    send = found[f"send agents:{agent}"]
    process = found[f"process agents:{agent}:agents.{agent}"]
    ack = found[f"ack agents:{agent}:agents.{agent}"]
    reply = found["send"]

    assert len({trace_id(span) for span in found.values()}) == 1
    assert [parent_of(call), parent_of(send), parent_of(process)] == [
        None,
        span_id(call),
        span_id(send),
    ]
    assert parent_of(ack) == span_id(process)
    assert parent_of(reply) == span_id(process)
    assert [call.kind, send.kind, process.kind, ack.kind, reply.kind] == [
        SpanKind.CLIENT,
        SpanKind.PRODUCER,
        SpanKind.CONSUMER,
        SpanKind.CLIENT,
        SpanKind.PRODUCER,
    ]
    assert dict(call.attributes or {}) == {
        "rpc.system.name": "amqp_agents",
        "rpc.method": f"{agent}/echo",
        "messaging.system": "rabbitmq",
        **SERVER,
    }
    correlation_id = (send.attributes or {})["messaging.message.conversation_id"]
    assert dict(send.attributes or {}) == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": f"agents:{agent}",
        "messaging.rabbitmq.destination.routing_key": agent,
        "messaging.message.id": correlation_id,
        "messaging.message.conversation_id": correlation_id,
        "messaging.message.body.size": len(b'{"n":1}'),
        **SERVER,
    }
    assert dict(process.attributes or {}) == {
        **dict(send.attributes or {}),
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": f"agents:{agent}:agents.{agent}",
    }
    assert dict(ack.attributes or {}) == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "settle",
        "messaging.operation.name": "ack",
        "messaging.destination.name": f"agents:{agent}:agents.{agent}",
        "messaging.rabbitmq.destination.routing_key": agent,
        "messaging.message.id": correlation_id,
        "messaging.message.conversation_id": correlation_id,
        **SERVER,
    }
    reply_attributes = dict(reply.attributes or {})
    assert reply_attributes["messaging.message.conversation_id"] == correlation_id
    assert reply_attributes["messaging.destination.anonymous"] is True
    assert str(reply_attributes["messaging.destination.name"]).startswith("amq.gen-")
    assert all(span.status.status_code is StatusCode.UNSET for span in found.values())


async def test_an_error_reply_marks_the_call_and_process_spans(
    backend: Backend, spans: Spans
) -> None:
    agent = backend.unique("echo")
    server, caller = await backend.connect(), await backend.connect()
    worker = Worker(server, [Echo(name=agent)], tracing=tracing(spans))
    await worker.start()
    try:
        async with RpcClient(caller, tracing=tracing(spans)) as client:
            response = await client.send(agent, "echo", {"missing": True})
            assert response.error is not None
            assert response.error.code == "NOT_FOUND"
        found = await spans.named(f"{agent}/echo", f"process agents:{agent}:agents.{agent}")
    finally:
        await worker.stop()
    for span in found.values():
        assert (span.attributes or {})["error.type"] == "NOT_FOUND"
        assert span.status.status_code is StatusCode.ERROR
    (send,) = [s for s in spans.finished if s.name == f"send agents:{agent}"]
    assert "error.type" not in (send.attributes or {})


async def test_an_event_is_processed_in_the_publishers_trace(
    backend: Backend, spans: Spans
) -> None:
    event_type = backend.unique("happened").replace("-", "_")
    group = backend.unique("group")
    publisher_transport, subscriber_transport = await backend.connect(), await backend.connect()
    seen: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()

    async def handler(event: Event) -> None:
        context = trace.get_current_span().get_span_context()
        seen.set_result((context.trace_id, context.span_id))

    async with (
        EventBus(publisher_transport, tracing=tracing(spans)) as publisher,
        EventBus(subscriber_transport, tracing=tracing(spans)) as subscriber,
    ):
        await subscriber.subscribe(event_type, handler, group=group)
        outer = spans.provider.get_tracer("test")
        with outer.start_as_current_span("the publisher's work"):
            event_id = await publisher.publish(event_type, {"n": 1})
        handler_context = await asyncio.wait_for(seen, backend.timeout_s)
        found = await spans.named(
            "the publisher's work",
            f"send events:{event_type}",
            f"process events:{event_type}:events.{group}",
            f"ack events:{event_type}:events.{group}",
        )
    work = found["the publisher's work"]
    send = found[f"send events:{event_type}"]
    process = found[f"process events:{event_type}:events.{group}"]
    ack = found[f"ack events:{event_type}:events.{group}"]

    assert len({trace_id(span) for span in found.values()}) == 1
    assert parent_of(send) == span_id(work)
    assert parent_of(process) == span_id(send)
    assert parent_of(ack) == span_id(process)
    assert handler_context == (trace_id(process), span_id(process))
    assert (send.kind, process.kind, ack.kind) == (
        SpanKind.PRODUCER,
        SpanKind.CONSUMER,
        SpanKind.CLIENT,
    )
    assert dict(process.attributes or {}) == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": f"events:{event_type}:events.{group}",
        "messaging.rabbitmq.destination.routing_key": event_type,
        "messaging.message.id": event_id,
        "messaging.message.body.size": (send.attributes or {})["messaging.message.body.size"],
        **SERVER,
    }


async def test_a_handler_calling_another_agent_makes_one_trace_across_three_services(
    backend: Backend, spans: Spans
) -> None:
    front_name, back_name = backend.unique("front"), backend.unique("back")
    front_transport, back_transport, caller = (
        await backend.connect(),
        await backend.connect(),
        await backend.connect(),
    )
    front_tracing = tracing(spans)
    back = Worker(back_transport, [Echo(name=back_name)], tracing=tracing(spans))
    await back.start()
    try:
        async with RpcClient(front_transport, tracing=front_tracing) as front_client:
            front_agent = Front(name=front_name, back=back_name, client=front_client)
            front = Worker(front_transport, [front_agent], tracing=front_tracing)
            await front.start()
            try:
                async with RpcClient(caller, tracing=tracing(spans)) as client:
                    assert await client.call(front_name, "ask", {"n": 2}) == {"n": 2}
                found = await spans.named(
                    f"{front_name}/ask",
                    f"send agents:{front_name}",
                    f"process agents:{front_name}:agents.{front_name}",
                    f"{back_name}/echo",
                    f"send agents:{back_name}",
                    f"process agents:{back_name}:agents.{back_name}",
                    f"ack agents:{back_name}:agents.{back_name}",
                    f"ack agents:{front_name}:agents.{front_name}",
                )
            finally:
                await front.stop()
    finally:
        await back.stop()

    chain = [
        found[f"{front_name}/ask"],
        found[f"send agents:{front_name}"],
        found[f"process agents:{front_name}:agents.{front_name}"],
        found[f"{back_name}/echo"],
        found[f"send agents:{back_name}"],
        found[f"process agents:{back_name}:agents.{back_name}"],
    ]
    assert len({trace_id(span) for span in found.values()}) == 1
    assert [parent_of(span) for span in chain] == [None, *(span_id(s) for s in chain[:-1])]
    assert parent_of(found[f"ack agents:{back_name}:agents.{back_name}"]) == span_id(chain[-1])
    assert parent_of(found[f"ack agents:{front_name}:agents.{front_name}"]) == span_id(chain[2])
