"""The example app's orchestrator: ``planner`` turns a plan into tasks through other agents.

``plan_create`` asks ``task_manager`` for one task per title, a few at a time
(:func:`~amqp_agents.bounds.gather_limited`), then reads ``audit``'s log and returns a
summary. It knows the other agents only by their wire contract (agent and action names,
JSON payloads), as a service in another language would.

Every call it makes follows the request it serves (see
:mod:`~amqp_agents.models.context`): when its caller gives up, the calls still running
end with it, the ones not started are never sent, and the requests already queued are
dropped unstarted by the broker or by ``task_manager``'s worker.

An orchestrator holds a worker slot while it waits for the agents it calls: a worker
that hosts it beside them needs ``concurrency`` above the number of plans run at once.
"""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from amqp_agents.bounds import gather_limited
from amqp_agents.runtime.agent import Agent, action

__all__ = ["Plan", "PlanSummary", "Planner"]


class Plan(BaseModel):
    """Payload of ``plan_create``."""

    model_config = ConfigDict(extra="forbid")

    titles: list[str] = Field(min_length=1, max_length=100)
    concurrency: int = Field(default=3, ge=1, le=20)
    """How many ``task_add`` calls run at once."""


class PlanSummary(BaseModel):
    """Reply of ``plan_create``."""

    task_ids: list[str]
    """The new tasks, in the plan's order."""
    audited: int
    """How many of them the audit log has recorded so far (it records events as they
    arrive, so it may lag behind)."""
    audit_entries: int
    """Entries in the audit log."""


class Planner(Agent):
    """Agent ``planner``: creates the tasks of a plan through ``task_manager``."""

    name = "planner"
    calls_agents = True

    @action("plan_create")
    async def create(self, plan: Plan) -> PlanSummary:
        """Create one task per title (``plan.concurrency`` at a time), then summarise."""
        calls = [
            functools.partial(self.rpc.call, "task_manager", "task_add", {"title": title})
            for title in plan.titles
        ]
        tasks: list[dict[str, Any]] = await gather_limited(calls, limit=plan.concurrency)
        ids = [str(task["id"]) for task in tasks]
        log = await self.rpc.call("audit", "audit_log")
        recorded = {entry.get("task_id") for entry in log["entries"]}
        return PlanSummary(
            task_ids=ids,
            audited=sum(task_id in recorded for task_id in ids),
            audit_entries=len(log["entries"]),
        )
