"""The shortest end-to-end path: a worker answers one call."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from amqp_agents.examples.tasks import TaskManager
from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.worker import Worker
from amqp_agents.transport.rabbitmq import RabbitTransport


async def test_round_trip(
    connect: Callable[..., Awaitable[RabbitTransport]], unique: Callable[[str], str]
) -> None:
    agent = TaskManager(name=unique("tasks"))
    worker = Worker(await connect(), [agent])
    await worker.start()
    try:
        async with RpcClient(await connect()) as client:
            reply = await client.send(agent.name, "task_add", {"title": "hello"})
        assert reply.ok
        assert isinstance(reply.data, dict)
        assert reply.data == {"id": reply.data["id"], "title": "hello", "completed": False}
    finally:
        await worker.stop()
