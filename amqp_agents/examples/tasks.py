"""The example app: a task manager agent over a storage protocol, and an audit agent.

``task_manager`` emits ``task.created`` and ``task.completed``; ``audit`` records every
``task.*`` event (group ``audit``: one replica handles each) and answers ``audit_log``.

Run it with ``amqp-agents run amqp_agents.examples.tasks:app`` and call it with
``amqp-agents call task_manager task_add '{"title": "write docs"}'``.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from amqp_agents.errors import NotFoundError
from amqp_agents.models.messages import Event
from amqp_agents.runtime.agent import Agent, action, on_event

__all__ = [
    "AuditAgent",
    "AuditEntry",
    "AuditLog",
    "InMemoryTaskStore",
    "Task",
    "TaskAdd",
    "TaskEvent",
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


class TaskEvent(BaseModel):
    """Payload of ``task.created`` and ``task.completed``."""

    id: int
    title: str


class AuditEntry(BaseModel):
    """One recorded event."""

    event_id: str
    type: str
    task_id: int | None = None


class AuditLog(BaseModel):
    """Reply of ``audit_log``."""

    entries: list[AuditEntry]


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
        """Create a task and emit ``task.created``."""
        task = await self.store.add(payload.title)
        await self.emit("task.created", TaskEvent(id=task.id, title=task.title))
        return task

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
        """Mark a task completed and emit ``task.completed`` (once: it is idempotent)."""
        task = await self.get(payload)
        if task.completed:
            return task
        done = task.model_copy(update={"completed": True})
        await self.store.save(done)
        await self.emit("task.completed", TaskEvent(id=done.id, title=done.title))
        return done


class AuditAgent(Agent):
    """Agent ``audit``: records task events; ``audit_log`` returns them."""

    name = "audit"

    def __init__(self, *, name: str | None = None, maxlen: int = 10_000) -> None:
        super().__init__(name=name)
        self._entries: dict[str, AuditEntry] = {}  # by event id, oldest first
        self._maxlen = maxlen

    @on_event("task.*", group="audit")
    async def record(self, event: Event) -> None:
        """Record a task event once (redeliveries are deduplicated by event id)."""
        if event.id in self._entries:
            return
        task_id = event.payload.get("id")
        self._entries[event.id] = AuditEntry(
            event_id=event.id,
            type=event.type,
            task_id=task_id if isinstance(task_id, int) else None,
        )
        if len(self._entries) > self._maxlen:
            del self._entries[next(iter(self._entries))]

    @action("audit_log")
    async def log(self) -> AuditLog:
        """Every recorded event, oldest first."""
        return AuditLog(entries=list(self._entries.values()))


def app() -> list[Agent]:
    """The agents ``amqp-agents run amqp_agents.examples.tasks:app`` hosts."""
    return [TaskManager(), AuditAgent()]
