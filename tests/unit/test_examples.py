"""The example agents (TaskManager, AuditAgent), called directly and through handle()."""

from datetime import UTC, datetime

import pytest

from amqp_agents.errors import NotFoundError
from amqp_agents.events.publisher import RecordingPublisher
from amqp_agents.examples.tasks import (
    AuditAgent,
    AuditEntry,
    InMemoryTaskStore,
    Task,
    TaskAdd,
    TaskEvent,
    TaskManager,
    TaskRef,
    app,
)
from amqp_agents.models.messages import AgentMessage, ErrorCode, Event


@pytest.fixture
def tasks() -> TaskManager:
    """A task manager on a fresh in-memory store."""
    return TaskManager(InMemoryTaskStore())


async def test_add_then_get(tasks: TaskManager) -> None:
    """add() stores an open task with the next id, and get() returns it."""
    first = await tasks.add(TaskAdd(title="write docs"))
    second = await tasks.add(TaskAdd(title="ship"))

    assert first == Task(id=1, title="write docs", completed=False)
    assert second.id == 2
    assert await tasks.get(TaskRef(id=1)) == first


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
        await tasks.get(TaskRef(id=42))
    with pytest.raises(NotFoundError):
        await tasks.complete(TaskRef(id=42))


async def test_request_path(tasks: TaskManager) -> None:
    """Through handle(): add replies with the task, a missing get replies NOT_FOUND."""
    added = await tasks.handle(AgentMessage(action="task_add", payload={"title": "t"}))
    missing = await tasks.handle(AgentMessage(action="task_get", payload={"id": 9}))

    assert added.ok is True
    assert added.data == Task(id=1, title="t")
    assert missing.code == ErrorCode.NOT_FOUND


@pytest.mark.parametrize(
    ("action", "payload"),
    [
        ("task_add", {"title": ""}),
        ("task_add", {"title": "t", "owner": "me"}),
        ("task_get", {"id": 0}),
        ("task_get", {}),
    ],
)
async def test_request_path_rejects_bad_payloads(
    tasks: TaskManager, action: str, payload: dict[str, object]
) -> None:
    """Empty titles, unknown fields and ids below 1 reply INVALID_PAYLOAD."""
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
        ("task.created", TaskEvent(id=1, title="x")),
        ("task.completed", TaskEvent(id=1, title="x")),
    ]


async def test_failed_requests_emit_nothing(tasks: TaskManager) -> None:
    """A NOT_FOUND or INVALID_PAYLOAD request leaves no event behind."""
    await tasks.handle(AgentMessage(action="task_complete", payload={"id": 5}))
    await tasks.handle(AgentMessage(action="task_add", payload={}))

    assert _recorded(tasks) == []


def _event(event_id: str, event_type: str = "task.created", task_id: object = 1) -> Event:
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
        AuditEntry(event_id="e1", type="task.created", task_id=1),
        AuditEntry(event_id="e2", type="task.completed", task_id=1),
    ]


async def test_audit_keeps_non_integer_task_ids_out() -> None:
    """An event whose payload id is not an int is recorded with task_id None."""
    audit = AuditAgent()

    await audit.record(_event("e1", task_id="seven"))

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
    """app() returns a TaskManager and an AuditAgent serving their actions."""
    agents = app()

    assert [type(agent) for agent in agents] == [TaskManager, AuditAgent]
    assert [agent.name for agent in agents] == ["task_manager", "audit"]
    assert set(agents[0].actions()) == {"task_add", "task_get", "task_list", "task_complete"}
    assert set(agents[1].actions()) == {"audit_log"}


def test_stores_are_not_shared() -> None:
    """Each TaskManager gets its own store unless one is passed in."""
    assert TaskManager().store is not TaskManager().store
