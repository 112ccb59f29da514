"""The example app: a task manager agent over a storage protocol, an audit agent, and an
orchestrator.

``task_manager`` emits ``task.created`` and ``task.completed``; ``audit`` records every
``task.*`` event (group ``audit``: one replica handles each) and answers ``audit_log``;
``planner`` (:mod:`amqp_agents.examples.planner`) creates the tasks of a plan through
``task_manager``, a few at a time, and summarises them with ``audit``'s log.

Run it with ``amqp-agents run amqp_agents.examples.tasks:app`` and call it with
``amqp-agents call task_manager task_add '{"title": "write docs"}'``.

Tasks have string ids (``str(uuid4())``), unique across replicas. Where they live is
chosen by ``TASKS_STORE_URL``: ``memory://`` (the default: one process, for the demo and
tests) or ``redis://host:6379/0``, a store shared by every replica, so that a task made
on one is found on any other when the app is scaled out (``amqp-agents[redis]``).
The audit log stays per replica: each replica records the events it handled.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from amqp_agents.errors import ConfigurationError, NotFoundError
from amqp_agents.examples.planner import Planner
from amqp_agents.models.messages import Event
from amqp_agents.runtime.agent import Agent, action, on_event

if TYPE_CHECKING:
    from collections.abc import Mapping

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
    "TaskStoreSettings",
    "app",
    "open_store",
]


class Task(BaseModel):
    """A task as stored and returned."""

    id: str
    title: str
    completed: bool = False


class TaskAdd(BaseModel):
    """Payload of ``task_add``."""

    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1, max_length=500)


class TaskRef(BaseModel):
    """Payload of ``task_get`` and ``task_complete``: any id a task could have (one that
    names no task is answered ``NOT_FOUND``)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=100)


class TaskList(BaseModel):
    """Reply of ``task_list``."""

    tasks: list[Task]


class TaskEvent(BaseModel):
    """Payload of ``task.created`` and ``task.completed``."""

    id: str
    title: str


class AuditEntry(BaseModel):
    """One recorded event."""

    event_id: str
    type: str
    task_id: str | None = None


class AuditLog(BaseModel):
    """Reply of ``audit_log``."""

    entries: list[AuditEntry]


class TaskStore(Protocol):
    """Where tasks live; swap in a database-backed one without touching the agent."""

    async def open(self) -> None:
        """Get ready (reach the database); called when the agent starts, maybe again
        after :meth:`aclose` (the worker restarts agents after a reconnect)."""
        ...

    async def add(self, title: str) -> Task:
        """Store a new, open task under a new unique id."""
        ...

    async def get(self, task_id: str) -> Task | None:
        """The task, or ``None``."""
        ...

    async def list(self) -> list[Task]:
        """Every task, oldest first."""
        ...

    async def save(self, task: Task) -> None:
        """Replace a stored task."""
        ...

    async def aclose(self) -> None:
        """Release connections; called when the agent stops."""
        ...


def new_task_id() -> str:
    """A task id no other replica can hand out."""
    return str(uuid.uuid4())


class InMemoryTaskStore:
    """A :class:`TaskStore` in a dict: one process only, for the demo and tests."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}  # insertion order: oldest first
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        """Nothing to reach."""

    async def add(self, title: str) -> Task:
        async with self._lock:
            task = Task(id=new_task_id(), title=title)
            self._tasks[task.id] = task
            return task

    async def get(self, task_id: str) -> Task | None:
        return self._tasks.get(task_id)

    async def list(self) -> list[Task]:
        return list(self._tasks.values())

    async def save(self, task: Task) -> None:
        self._tasks[task.id] = task

    async def aclose(self) -> None:
        """Nothing to release (the tasks stay)."""


class TaskStoreSettings(BaseSettings):
    """Where the example app keeps its tasks: ``TASKS_STORE_URL``, ``TASKS_KEY_PREFIX``,
    ``TASKS_OPEN_TIMEOUT_S``."""

    model_config = SettingsConfigDict(env_prefix="TASKS_", extra="forbid", frozen=True)

    store_url: str = "memory://"
    """``memory://`` (one process) or ``redis://[:password@]host:port/db`` (shared)."""
    key_prefix: str = Field(default="tasks:", min_length=1, max_length=100)
    """Prefix of every Redis key of the store (one app per prefix)."""
    open_timeout_s: float = Field(default=30.0, gt=0, le=600)
    """How long a starting worker waits for the store to answer before it gives up."""


def open_store(settings: TaskStoreSettings) -> TaskStore:
    """The store ``settings`` names.

    Raises:
        ConfigurationError: an unknown scheme, or Redis asked for without the ``redis``
            package (``pip install 'amqp-agents[redis]'``).
    """
    scheme = settings.store_url.partition("://")[0]
    if scheme == "memory":
        return InMemoryTaskStore()
    if scheme in ("redis", "rediss"):
        try:
            from amqp_agents.examples.redis_store import RedisTaskStore
        except ImportError as exc:
            raise ConfigurationError(
                f"TASKS_STORE_URL is a Redis URL but {exc.name} is not installed:"
                " pip install 'amqp-agents[redis]'"
            ) from None
        return RedisTaskStore(
            settings.store_url,
            key_prefix=settings.key_prefix,
            open_timeout_s=settings.open_timeout_s,
        )
    raise ConfigurationError(
        f"TASKS_STORE_URL must start with memory:// or redis://, not {scheme}://"
    )


class TaskManager(Agent):
    """Agent ``task_manager``: add, get, list and complete tasks."""

    name = "task_manager"
    emits: ClassVar[Mapping[str, type[BaseModel]]] = {
        "task.created": TaskEvent,
        "task.completed": TaskEvent,
    }

    def __init__(self, store: TaskStore | None = None, *, name: str | None = None) -> None:
        super().__init__(name=name)
        self.store: TaskStore = store or InMemoryTaskStore()

    async def start(self) -> None:
        """Open the store: a worker whose store is unreachable does not start."""
        await self.store.open()
        await super().start()

    async def shutdown(self) -> None:
        """Close the store's connections."""
        await self.store.aclose()
        await super().shutdown()

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
            task_id=task_id if isinstance(task_id, str) else None,
        )
        if len(self._entries) > self._maxlen:
            del self._entries[next(iter(self._entries))]

    @action("audit_log")
    async def log(self) -> AuditLog:
        """Every recorded event, oldest first."""
        return AuditLog(entries=list(self._entries.values()))


def app() -> list[Agent]:
    """The agents ``amqp-agents run amqp_agents.examples.tasks:app`` hosts, on the store
    the ``TASKS_*`` environment variables name (in memory by default), and the
    planner that calls them."""
    return [TaskManager(open_store(TaskStoreSettings())), AuditAgent(), Planner()]
