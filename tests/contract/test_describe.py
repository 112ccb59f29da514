"""In-band discovery through the broker, on both backends: ``$describe`` is answered by
a running worker like any action, and its schemas judge payloads as the agent does."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import jsonschema

from amqp_agents.examples.tasks import AuditAgent, TaskManager
from amqp_agents.models.topology import ACTION_DESCRIBE
from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.agent import Agent
from amqp_agents.runtime.describe import Description
from amqp_agents.runtime.worker import Worker
from tests.contract.conftest import Backend


@contextlib.asynccontextmanager
async def serving(backend: Backend, *agents: Agent) -> AsyncIterator[RpcClient]:
    """A started worker for ``agents`` and a client on another connection."""
    worker = Worker(await backend.connect(), list(agents))
    await worker.start()
    try:
        async with RpcClient(await backend.connect()) as client:
            yield client
    finally:
        await worker.stop()


async def test_a_running_agent_describes_itself(backend: Backend) -> None:
    """The reply to ``$describe`` lists the agent's actions, subscriptions and events."""
    manager = TaskManager(name=backend.unique("tasks"))
    audit = AuditAgent(name=backend.unique("audit"))
    async with serving(backend, manager, audit) as client:
        described = Description.model_validate(
            await client.call(manager.name, ACTION_DESCRIBE, timeout_s=10)
        )
        audited = Description.model_validate(
            await client.call(audit.name, ACTION_DESCRIBE, timeout_s=10)
        )

    assert described.agent == manager.name
    assert set(described.actions) == set(manager.actions())
    assert set(described.emits) == set(TaskManager.emits)
    assert set(audited.actions) == {"audit_log"}
    assert [(s.pattern, s.group) for s in audited.subscriptions] == [("task.*", "audit")]


async def test_the_described_schema_judges_payloads_as_the_agent_does(backend: Backend) -> None:
    """A payload the schema accepts is answered ok; one it refuses, INVALID_PAYLOAD."""
    manager = TaskManager(name=backend.unique("tasks"))
    async with serving(backend, manager) as client:
        described = await client.call(manager.name, ACTION_DESCRIBE, timeout_s=10)
        schema = described["actions"]["task_add"]["payload"]
        validator = jsonschema.validators.validator_for(schema)(schema)
        verdicts: list[tuple[bool, bool, str | None]] = []
        payloads: list[dict[str, Any]] = [{"title": "ok"}, {"title": ""}, {"name": "x"}]
        for payload in payloads:
            reply = await client.send(manager.name, "task_add", payload, timeout_s=10)
            code = None if reply.error is None else reply.error.code
            verdicts.append((validator.is_valid(payload), reply.ok, code))

    assert verdicts == [
        (True, True, None),
        (False, False, "INVALID_PAYLOAD"),
        (False, False, "INVALID_PAYLOAD"),
    ]
