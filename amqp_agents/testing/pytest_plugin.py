"""A pytest plugin: fixtures to test your agents on the in-memory broker.

Enable it in ``conftest.py`` with ``pytest_plugins = ["amqp_agents.testing.pytest_plugin"]``
(needs pytest-asyncio). Then::

    async def test_add(agent_harness):
        async with agent_harness(TaskManager()) as harness:
            assert (await harness.call("task_manager", "task_add", {"title": "x"}))["id"] == 1
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from amqp_agents.testing.harness import AgentHarness
from amqp_agents.transport.memory import InMemoryBroker

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["agent_harness", "memory_broker"]


@pytest.fixture
def memory_broker() -> InMemoryBroker:
    """A fresh in-memory broker for this test."""
    return InMemoryBroker()


@pytest.fixture
def agent_harness(memory_broker: InMemoryBroker) -> Callable[..., AgentHarness]:
    """``agent_harness(*agents, **options)`` -> an :class:`AgentHarness` on this test's broker."""

    def build(*agents: Any, **options: Any) -> AgentHarness:
        options.setdefault("broker", memory_broker)
        return AgentHarness(*agents, **options)

    return build
