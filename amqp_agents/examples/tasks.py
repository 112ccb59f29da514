"""The example app: a task manager agent over a storage protocol.

Run it with ``amqp-agents run amqp_agents.examples.tasks:app`` and call it with
``amqp-agents call task_manager task_add '{"title": "write docs"}'``.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from amqp_agents.errors import NotFoundError
from amqp_agents.runtime.agent import Agent, action

__all__ = [
    "InMemoryTaskStore",
    "Task",
    "TaskAdd",
    "TaskManager",
    "TaskRef",
    "TaskStore",
    "app",
]


class Task(BaseModel):
    """A task as stored and returned."""

    id: int
    title: str
    completed: bool = False


class TaskAdd(BaseModel):
    """Payload of ``task_add``."""

    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1, max_length=500)


class TaskRef(BaseModel):
    """Payload of ``task_get`` and ``task_complete``."""

    model_config = ConfigDict(extra="forbid")

    id: int = Field(ge=1)


class TaskList(BaseModel):
    """Reply of ``task_list``."""

    tasks: list[Task]


class TaskStore(Protocol):
    """Where tasks live; swap in a database-backed one without touching the agent."""

    async def add(self, title: str) -> Task:
        """Store a new, open task."""
        ...

    async def get(self, task_id: int) -> Task | None:
        """The task, or ``None``."""
        ...

    async def list(self) -> list[Task]:
        """Every task, oldest first."""
        ...

    async def save(self, task: Task) -> None:
        """Replace a stored task."""
        ...


class InMemoryTaskStore:
    """A :class:`TaskStore` in a dict, for the demo and tests."""

    def __init__(self) -> None:
        self._tasks: dict[int, Task] = {}
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()

    async def add(self, title: str) -> Task:
        async with self._lock:
            task = Task(id=next(self._ids), title=title)
            self._tasks[task.id] = task
            return task

    async def get(self, task_id: int) -> Task | None:
        return self._tasks.get(task_id)

    async def list(self) -> list[Task]:
        return list(self._tasks.values())

    async def save(self, task: Task) -> None:
        self._tasks[task.id] = task


class TaskManager(Agent):
    """Agent ``task_manager``: add, get, list and complete tasks."""

    name = "task_manager"

    def __init__(self, store: TaskStore | None = None, *, name: str | None = None) -> None:
        super().__init__(name=name)
        self.store: TaskStore = store or InMemoryTaskStore()

    @action("task_add")
    async def add(self, payload: TaskAdd) -> Task:
        """Create a task."""
        return await self.store.add(payload.title)

    @action("task_get")
    async def get(self, payload: TaskRef) -> Task:
        """One task; ``NOT_FOUND`` if there is none with that id."""
        task = await self.store.get(payload.id)
        if task is None:
            raise NotFoundError(f"no task with id {payload.id}")
        return task

    @action("task_list")
    async def list(self) -> TaskList:
        """Every task."""
        return TaskList(tasks=await self.store.list())

    @action("task_complete")
    async def complete(self, payload: TaskRef) -> Task:
        """Mark a task completed (idempotent)."""
        task = await self.get(payload)
        done = task.model_copy(update={"completed": True})
        await self.store.save(done)
        return done


def app() -> list[Agent]:
    """The agents ``amqp-agents run amqp_agents.examples.tasks:app`` hosts."""
    return [TaskManager()]
