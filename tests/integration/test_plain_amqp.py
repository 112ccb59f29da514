"""The wire contract, from a plain AMQP client (pika) that knows nothing of this library.

Only the documented wire contract is used: publish to exchange ``agents`` with
routing key = agent name and the properties ``type`` (action), ``correlation_id``,
``reply_to``, ``message_id``, ``priority``, ``content_type: application/json``; read
``{"ok": true, "data": ...}`` or ``{"ok": false, "error": {"code", "message"}}`` from
the reply queue under the same ``correlation_id``; ask ``$describe`` for the schemas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jsonschema
import pika

from amqp_agents.examples.tasks import TaskManager
from amqp_agents.runtime.agent import Agent, action
from amqp_agents.runtime.worker import Worker
from amqp_agents.transport.rabbitmq import RabbitTransport

Connect = Callable[..., Awaitable[RabbitTransport]]
Unique = Callable[[str], str]


class Inbox(Agent):
    """Keeps the payloads it is sent and signals each arrival."""

    def __init__(self, *, name: str) -> None:
        super().__init__(name=name)
        self.received: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()

    @action("deliver")
    async def deliver(self, payload: dict[str, Any]) -> None:
        self.received.append(payload)
        self.arrived.set()


@dataclass(frozen=True)
class PlainReply:
    """What the plain client read from its reply queue."""

    correlation_id: str | None
    content_type: str | None
    body: dict[str, Any]


@contextlib.asynccontextmanager
async def running(transport: RabbitTransport, agent: Agent) -> AsyncIterator[Worker]:
    """A started worker, always stopped on the way out."""
    worker = Worker(transport, [agent])
    try:
        await worker.start()
        yield worker
    finally:
        await worker.stop()


def plain_call(
    url: str,
    agent: str,
    action_name: str,
    payload: dict[str, Any],
    *,
    priority: int = 7,
    timeout_s: float = 10.0,
) -> PlainReply:
    """One request/reply with pika's blocking client (run it in a thread)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        reply_queue = channel.queue_declare(queue="", exclusive=True).method.queue
        correlation_id = uuid.uuid4().hex
        channel.basic_publish(
            exchange="agents",
            routing_key=agent,
            body=json.dumps(payload).encode(),
            properties=pika.BasicProperties(
                type=action_name,
                correlation_id=correlation_id,
                reply_to=reply_queue,
                message_id=uuid.uuid4().hex,
                priority=priority,
                content_type="application/json",
            ),
        )
        for _method, properties, body in channel.consume(
            reply_queue, auto_ack=True, inactivity_timeout=timeout_s
        ):
            if properties is None:
                raise TimeoutError(f"no reply on {reply_queue} within {timeout_s:g}s")
            if properties.correlation_id == correlation_id:
                return PlainReply(
                    properties.correlation_id, properties.content_type, json.loads(body)
                )
        raise AssertionError("unreachable: consume() yields until a reply or a timeout")
    finally:
        connection.close()


def plain_notify(url: str, agent: str, action_name: str, payload: dict[str, Any]) -> None:
    """One fire-and-forget request (no reply_to) with pika, confirmed by the broker."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            exchange="agents",
            routing_key=agent,
            body=json.dumps(payload).encode(),
            properties=pika.BasicProperties(
                type=action_name,
                message_id=uuid.uuid4().hex,
                content_type="application/json",
            ),
            mandatory=True,
        )
    finally:
        connection.close()


async def test_plain_client_gets_a_success_reply(
    connect: Connect, unique: Unique, amqp_url: str
) -> None:
    """A pika request gets {"ok": true, "data": ...} under its own correlation id."""
    agent = TaskManager(name=unique("tasks"))
    async with running(await connect(), agent):
        reply = await asyncio.to_thread(
            plain_call, amqp_url, agent.name, "task_add", {"title": "from pika"}
        )
    assert reply.content_type == "application/json"
    task_id = reply.body["data"]["id"]
    assert reply.body == {
        "ok": True,
        "data": {"id": task_id, "title": "from pika", "completed": False},
    }


async def test_plain_client_gets_an_error_reply(
    connect: Connect, unique: Unique, amqp_url: str
) -> None:
    """A failing pika request gets {"ok": false, "error": {"code", "message"}}."""
    agent = TaskManager(name=unique("tasks"))
    async with running(await connect(), agent):
        reply = await asyncio.to_thread(plain_call, amqp_url, agent.name, "task_get", {"id": "42"})
    assert reply.body["ok"] is False
    error = reply.body["error"]
    assert error["code"] == "NOT_FOUND"
    assert isinstance(error["message"], str)
    assert error["message"]
    assert "data" not in reply.body or reply.body["data"] is None


async def test_plain_request_with_priority_5_is_answered(
    connect: Connect, unique: Unique, amqp_url: str
) -> None:
    """Any AMQP priority 0-9 is part of the contract; 5 is answered like the others."""
    agent = TaskManager(name=unique("tasks"))
    async with running(await connect(), agent):
        reply = await asyncio.to_thread(
            plain_call, amqp_url, agent.name, "task_list", {}, priority=5, timeout_s=2
        )
    assert reply.body == {"ok": True, "data": {"tasks": []}}


async def test_plain_request_without_reply_to_is_handled(
    connect: Connect, unique: Unique, amqp_url: str
) -> None:
    """A pika request with no reply_to is handled and acked without a reply."""
    agent = Inbox(name=unique("inbox"))
    async with running(await connect(), agent) as worker:
        await asyncio.to_thread(plain_notify, amqp_url, agent.name, "deliver", {"n": 1})
        async with asyncio.timeout(5):
            await agent.arrived.wait()
    assert agent.received == [{"n": 1}]
    assert worker.stats.replied == 0


async def test_plain_client_discovers_the_schemas_and_validates_a_payload(
    connect: Connect, unique: Unique, amqp_url: str
) -> None:
    """Discovery with nothing but pika and jsonschema: ask ``$describe`` (the reserved
    action, docs/protocol.md), validate payloads against the returned schema, and see
    the agent agree with the verdicts."""
    agent = TaskManager(name=unique("tasks"))
    async with running(await connect(), agent):
        described = await asyncio.to_thread(plain_call, amqp_url, agent.name, "$describe", {})
        assert described.body["ok"] is True
        schemas = described.body["data"]["actions"]
        schema = schemas["task_add"]["payload"]
        validator = jsonschema.validators.validator_for(schema)(schema)
        good, bad = {"title": "described"}, {"title": "x", "due": "tomorrow"}
        accepted = await asyncio.to_thread(plain_call, amqp_url, agent.name, "task_add", good)
        refused = await asyncio.to_thread(plain_call, amqp_url, agent.name, "task_add", bad)

    assert set(schemas) == {"task_add", "task_get", "task_list", "task_complete"}
    assert validator.is_valid(good)
    assert accepted.body["ok"] is True
    jsonschema.validate(accepted.body["data"], schemas["task_add"]["reply"])
    assert not validator.is_valid(bad)
    assert refused.body["error"]["code"] == "INVALID_PAYLOAD"
