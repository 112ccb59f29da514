"""The example agents (TaskManager, AuditAgent, Planner), called directly, through handle()
and through a harness."""

import uuid
from datetime import UTC, datetime

import pytest

from amqp_agents.errors import ConfigurationError, NotFoundError
from amqp_agents.events.publisher import RecordingPublisher
from amqp_agents.examples.planner import Plan, Planner
from amqp_agents.examples.redis_store import RedisTaskStore
from amqp_agents.examples.tasks import (
    AuditAgent,
    AuditEntry,
    InMemoryTaskStore,
    Task,
    TaskAdd,
    TaskEvent,
    TaskManager,
    TaskRef,
    TaskStoreSettings,
    app,
    open_store,
)
from amqp_agents.models.messages import AgentMessage, ErrorCode, Event
from amqp_agents.testing import AgentHarness


@pytest.fixture
def tasks() -> TaskManager:
    """A task manager on a fresh in-memory store."""
    return TaskManager(InMemoryTaskStore())


async def test_add_then_get(tasks: TaskManager) -> None:
    """add() stores an open task under a new UUID string, and get() returns it."""
    first = await tasks.add(TaskAdd(title="write docs"))
    second = await tasks.add(TaskAdd(title="ship"))

    assert first == Task(id=first.id, title="write docs", completed=False)
    assert str(uuid.UUID(first.id)) == first.id
    assert second.id != first.id
    assert await tasks.get(TaskRef(id=first.id)) == first


async def test_list_is_oldest_first(tasks: TaskManager) -> None:
    """list() returns every task in the order they were added."""
    assert (await tasks.list()).tasks == []
    for title in ("a", "b", "c"):
        await tasks.add(TaskAdd(title=title))

    assert [task.title for task in (await tasks.list()).tasks] == ["a", "b", "c"]


async def test_complete_marks_done_idempotently(tasks: TaskManager) -> None:
    """complete() sets completed, persists it, and completing again changes nothing."""
    added = await tasks.add(TaskAdd(title="x"))

    done = await tasks.complete(TaskRef(id=added.id))
    again = await tasks.complete(TaskRef(id=added.id))

    assert done.completed is True
    assert again == done
    assert await tasks.get(TaskRef(id=added.id)) == done


async def test_get_missing_raises_not_found(tasks: TaskManager) -> None:
    """get() and complete() of an unknown id raise NotFoundError naming the id."""
    with pytest.raises(NotFoundError, match="no task with id 42"):
        await tasks.get(TaskRef(id="42"))
    with pytest.raises(NotFoundError):
        await tasks.complete(TaskRef(id="42"))


async def test_request_path(tasks: TaskManager) -> None:
    """Through handle(): add replies with the task, a missing get replies NOT_FOUND."""
    added = await tasks.handle(AgentMessage(action="task_add", payload={"title": "t"}))
    missing = await tasks.handle(AgentMessage(action="task_get", payload={"id": "nope"}))

    assert added.ok is True
    assert isinstance(added.data, Task)
    assert added.data.title == "t"
    assert missing.code == ErrorCode.NOT_FOUND


@pytest.mark.parametrize("unknown", ["0", "999999", "not-a-uuid", "x" * 100])
async def test_any_unknown_id_is_not_found(tasks: TaskManager, unknown: str) -> None:
    """An id that names no task is NOT_FOUND, whatever its shape (not INVALID_PAYLOAD)."""
    for action in ("task_get", "task_complete"):
        reply = await tasks.handle(AgentMessage(action=action, payload={"id": unknown}))
        assert reply.code == ErrorCode.NOT_FOUND


@pytest.mark.parametrize(
    ("action", "payload"),
    [
        ("task_add", {"title": ""}),
        ("task_add", {"title": "t", "owner": "me"}),
        ("task_get", {"id": 7}),
        ("task_get", {"id": ""}),
        ("task_get", {}),
    ],
)
async def test_request_path_rejects_bad_payloads(
    tasks: TaskManager, action: str, payload: dict[str, object]
) -> None:
    """Empty titles, unknown fields, missing, empty or non-string ids: INVALID_PAYLOAD."""
    reply = await tasks.handle(AgentMessage(action=action, payload=payload))

    assert reply.code == ErrorCode.INVALID_PAYLOAD


def _recorded(agent: TaskManager) -> list[tuple[str, object]]:
    """The (type, payload) of every event the agent emitted so far."""
    assert isinstance(agent.events, RecordingPublisher)
    return [(event.type, event.payload) for event in agent.events.events]


async def test_add_and_complete_emit_events_once(tasks: TaskManager) -> None:
    """add() emits task.created; complete() emits task.completed only the first time."""
    added = await tasks.add(TaskAdd(title="x"))
    await tasks.complete(TaskRef(id=added.id))
    await tasks.complete(TaskRef(id=added.id))

    assert _recorded(tasks) == [
        ("task.created", TaskEvent(id=added.id, title="x")),
        ("task.completed", TaskEvent(id=added.id, title="x")),
    ]


async def test_failed_requests_emit_nothing(tasks: TaskManager) -> None:
    """A NOT_FOUND or INVALID_PAYLOAD request leaves no event behind."""
    await tasks.handle(AgentMessage(action="task_complete", payload={"id": "5"}))
    await tasks.handle(AgentMessage(action="task_add", payload={}))

    assert _recorded(tasks) == []


def _event(event_id: str, event_type: str = "task.created", task_id: object = "t1") -> Event:
    return Event(
        id=event_id,
        type=event_type,
        payload={"id": task_id, "title": "t"},
        timestamp=datetime(2024, 1, 1, tzinfo=UTC),
    )


async def test_audit_records_each_event_once() -> None:
    """A redelivered event (same id) is recorded once; audit_log lists entries oldest first."""
    audit = AuditAgent()

    await audit.record(_event("e1"))
    await audit.record(_event("e2", "task.completed"))
    await audit.record(_event("e1"))

    assert (await audit.log()).entries == [
        AuditEntry(event_id="e1", type="task.created", task_id="t1"),
        AuditEntry(event_id="e2", type="task.completed", task_id="t1"),
    ]


async def test_audit_keeps_non_string_task_ids_out() -> None:
    """An event whose payload id is not a string is recorded with task_id None."""
    audit = AuditAgent()

    await audit.record(_event("e1", task_id=7))

    assert (await audit.log()).entries[0].task_id is None


async def test_audit_drops_oldest_beyond_maxlen() -> None:
    """With maxlen entries recorded, a new event evicts the oldest."""
    audit = AuditAgent(maxlen=2)
    for event_id in ("e1", "e2", "e3"):
        await audit.record(_event(event_id))

    assert [entry.event_id for entry in (await audit.log()).entries] == ["e2", "e3"]


def test_audit_subscribes_to_task_events_in_its_group() -> None:
    """AuditAgent handles task.* in group 'audit' with its record() method."""
    [(spec, handler)] = AuditAgent().event_handlers()

    assert (spec.pattern, spec.group, spec.broadcast) == ("task.*", "audit", False)
    assert handler.__name__ == "record"


def test_app_hosts_the_example_agents() -> None:
    """app() returns a TaskManager, an AuditAgent and a Planner serving their actions."""
    agents = app()

    assert [type(agent) for agent in agents] == [TaskManager, AuditAgent, Planner]
    assert [agent.name for agent in agents] == ["task_manager", "audit", "planner"]
    assert set(agents[0].actions()) == {"task_add", "task_get", "task_list", "task_complete"}
    assert set(agents[1].actions()) == {"audit_log"}
    assert set(agents[2].actions()) == {"plan_create"}
    assert [agent.calls_agents for agent in agents] == [False, False, True]


def test_stores_are_not_shared() -> None:
    """Each TaskManager gets its own store unless one is passed in."""
    assert TaskManager().store is not TaskManager().store


def test_app_store_is_chosen_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """memory:// by default; TASKS_STORE_URL=redis://... gives the Redis store."""
    monkeypatch.delenv("TASKS_STORE_URL", raising=False)
    manager = app()[0]
    assert isinstance(manager, TaskManager)
    assert isinstance(manager.store, InMemoryTaskStore)
    monkeypatch.setenv("TASKS_STORE_URL", "redis://127.0.0.1:6379/0")
    manager = app()[0]
    assert isinstance(manager, TaskManager)
    assert isinstance(manager.store, RedisTaskStore)


def test_unknown_store_scheme_is_a_configuration_error() -> None:
    """A store URL of another kind fails at start, naming the variable."""
    with pytest.raises(ConfigurationError, match="TASKS_STORE_URL must start with"):
        open_store(TaskStoreSettings(store_url="postgres://db/tasks"))


async def test_planner_creates_the_tasks_and_summarises_them() -> None:
    """plan_create makes one task per title through task_manager, in the plan's order."""
    titles = [f"step {n}" for n in range(5)]
    async with AgentHarness(TaskManager(), AuditAgent(), Planner()) as harness:
        summary = await harness.call("planner", "plan_create", {"titles": titles})
        listing = await harness.call("task_manager", "task_list")
    assert [task["title"] for task in listing["tasks"]] == titles  # concurrency 3: all made
    by_title = {task["title"]: task["id"] for task in listing["tasks"]}
    assert summary["task_ids"] == [by_title[title] for title in titles]
    assert 0 <= summary["audited"] <= 5
    assert summary["audit_entries"] >= summary["audited"]


async def test_planner_called_directly_in_a_unit_test() -> None:
    """The handler is a plain method: give it a client and a context, and call it."""
    planner = Planner()
    async with AgentHarness(TaskManager(), AuditAgent()) as harness:
        planner.rpc = harness.client
        with AgentHarness.message_context(message_id="plan-1"):
            summary = await planner.create(Plan(titles=["a", "b"], concurrency=1))
        assert len(summary.task_ids) == 2
        await harness.settle()
        log = await harness.call("audit", "audit_log")
    assert summary.audit_entries <= len(log["entries"]) == 2
