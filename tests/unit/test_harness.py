"""The test harness users get: agents on the in-memory broker, bounded waits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from pydantic import BaseModel

from amqp_agents import Agent, NotFoundError, action, on_event
from amqp_agents.examples.tasks import AuditAgent, TaskManager
from amqp_agents.models.messages import Event
from amqp_agents.testing import AgentHarness


class Ping(BaseModel):
    n: int


class Slow(Agent):
    name = "slow"

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.seen: list[int] = []

    @action("ping")
    async def ping(self, payload: Ping) -> int:
        await self.release.wait()
        return payload.n

    @on_event("ping.sent")
    async def on_ping(self, event: Event) -> None:
        self.seen.append(int(event.payload["n"]))


async def test_call_and_events_through_the_plugin_fixture(
    agent_harness: Callable[..., AgentHarness],
) -> None:
    """The fixture runs the example app: calls, errors, emitted and recorded events."""
    audit = AuditAgent()
    async with agent_harness(TaskManager(), audit) as harness:
        task = await harness.call("task_manager", "task_add", {"title": "x"})
        assert task == {"id": task["id"], "title": "x", "completed": False}
        event = await harness.wait_for_event("task.*")
        assert (event.type, event.payload) == ("task.created", {"id": task["id"], "title": "x"})
        with pytest.raises(NotFoundError):
            await harness.call("task_manager", "task_get", {"id": "7"})

        async def audited() -> bool:
            log = await harness.call("audit", "audit_log")
            return [entry["type"] for entry in log["entries"]] == ["task.created"]

        await harness.wait_until(audited, what="the audit entry")  # an async condition
        await harness.settle()


async def test_waits_are_bounded_and_say_what_they_waited_for() -> None:
    """wait_for_event and wait_until raise TimeoutError naming the missing thing."""
    async with AgentHarness(TaskManager(), timeout_s=0.05) as harness:
        with pytest.raises(TimeoutError, match=r"matching 'task\.deleted'"):
            await harness.wait_for_event("task.deleted")
        with pytest.raises(TimeoutError, match="the flag did not hold"):
            await harness.wait_until(lambda: False, what="the flag")


async def test_settle_waits_for_in_flight_handlers() -> None:
    """settle() returns only once the handler has finished and its message is acked."""
    agent = Slow()
    async with AgentHarness(agent) as harness:
        await harness.client.notify("slow", "ping", {"n": 1})
        await harness.wait_until(lambda: harness.worker.in_flight == 1, what="a running handler")
        with pytest.raises(TimeoutError):
            await harness.settle(timeout_s=0.05)
        agent.release.set()
        await harness.settle()
        assert harness.worker.in_flight == 0


async def test_published_events_reach_agent_handlers() -> None:
    """harness.publish() delivers to @on_event handlers (default group: the agent)."""
    agent = Slow()
    async with AgentHarness(agent) as harness:
        await harness.publish("ping.sent", {"n": 3})
        await harness.wait_until(lambda: agent.seen == [3], what="the handler")
