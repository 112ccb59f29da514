"""RPC over the real broker: replies, every error code, bad requests, priorities, faults."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest

from amqp_agents.config import WorkerSettings
from amqp_agents.errors import (
    ActionTimeoutError,
    AgentError,
    InternalError,
    InvalidPayloadError,
    NoRouteError,
    NotFoundError,
    ShuttingDownError,
    TopologyMismatchError,
    UnknownActionError,
)
from amqp_agents.examples.tasks import TaskManager
from amqp_agents.models.envelope import Envelope
from amqp_agents.models.messages import ErrorCode, Priority
from amqp_agents.models.topology import Topology
from amqp_agents.rpc.client import Request, RpcClient
from amqp_agents.runtime.agent import Agent, action
from amqp_agents.runtime.worker import Worker, WorkerStats
from amqp_agents.testing import BrokerAdmin, url_for_vhost
from amqp_agents.transport.base import Delivery, QueueSpec
from amqp_agents.transport.rabbitmq import RabbitTransport
from tests.support import wait_until

Connect = Callable[..., Awaitable[RabbitTransport]]
Unique = Callable[[str], str]

SECRET = "hunter2-db-password"
"""Text a failing handler puts in its exception: it must reach the log, never the wire."""


# -- test agents ---------------------------------------------------------------------


class Echo(Agent):
    """Returns its payload after ``delay_s``; records how many requests overlapped."""

    def __init__(self, *, name: str) -> None:
        super().__init__(name=name)
        self.active = 0
        self.max_active = 0

    @action("echo")
    async def echo(self, payload: dict[str, Any]) -> dict[str, Any]:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(payload.get("delay_s", 0))  # simulated work, not a sync
        finally:
            self.active -= 1
        return payload


class Gate(Agent):
    """Holds every request until ``release`` is set, even once cancelled (like a commit)."""

    def __init__(self, *, name: str) -> None:
        super().__init__(name=name)
        self.release = asyncio.Event()
        self.entered = 0

    @action("hold")
    async def hold(self) -> str:
        self.entered += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            await self.release.wait()  # finish the critical section, then honour the cancel
            raise
        return "released"


class Faulty(Agent):
    """Fails the ways real handlers do."""

    @action("crash")
    async def crash(self) -> None:
        raise RuntimeError(f"cannot log in with password {SECRET}")

    @action("stall", timeout_s=0.2)
    async def stall(self) -> None:
        await asyncio.Event().wait()

    @action("unserialisable")
    async def unserialisable(self) -> object:
        return object()


class Recorder(Agent):
    """Records the ``n`` of each request in the order handled."""

    def __init__(self, *, name: str) -> None:
        super().__init__(name=name)
        self.seen: list[int] = []
        self.handled = asyncio.Event()

    @action("record")
    async def record(self, payload: dict[str, Any]) -> None:
        self.seen.append(payload["n"])
        self.handled.set()


# -- helpers -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(
    transport: RabbitTransport, agents: Sequence[Agent], **options: Any
) -> AsyncIterator[Worker]:
    """A started worker, always stopped on the way out."""
    worker = Worker(transport, agents, **options)
    try:
        await worker.start()
        yield worker
    finally:
        await worker.stop()


async def reply_inbox(transport: RabbitTransport) -> tuple[str, asyncio.Queue[Envelope]]:
    """An exclusive queue and the raw replies arriving on it (a hand-written caller)."""
    inbox: asyncio.Queue[Envelope] = asyncio.Queue()
    name = await transport.declare_queue(
        QueueSpec(name="", durable=False, exclusive=True, auto_delete=True)
    )

    async def on_reply(delivery: Delivery) -> None:
        inbox.put_nowait(delivery.envelope)

    await transport.consume(name, on_reply, prefetch=0, no_ack=True)
    return name, inbox


def request(agent: str, body: bytes, **properties: Any) -> Envelope:
    """A request published by hand to the ``agents`` exchange."""
    return Envelope(body=body, exchange="agents", routing_key=agent, **properties)


# -- replies -------------------------------------------------------------------------


async def test_task_manager_round_trip(connect: Connect, unique: Unique) -> None:
    """The example TaskManager adds, gets, completes and lists tasks over the broker."""
    agent = TaskManager(name=unique("tasks"))
    async with running(await connect(), [agent]), RpcClient(await connect()) as client:
        first = await client.call(agent.name, "task_add", {"title": "write tests"})
        second = await client.call(agent.name, "task_add", {"title": "run them"})
        fetched = await client.call(agent.name, "task_get", {"id": second["id"]})
        done = await client.call(agent.name, "task_complete", {"id": first["id"]})
        listed = await client.call(agent.name, "task_list")
    assert first == {"id": first["id"], "title": "write tests", "completed": False}
    assert second == fetched == {"id": second["id"], "title": "run them", "completed": False}
    assert done == {"id": first["id"], "title": "write tests", "completed": True}
    assert listed == {"tasks": [done, second]}


async def test_400_concurrent_calls_each_get_their_own_reply(
    connect: Connect, unique: Unique
) -> None:
    """400 calls in flight at once on one client: every reply reaches the call that sent it."""
    agent = Echo(name=unique("echo"))
    payloads = [{"i": i, "token": uuid.uuid4().hex} for i in range(400)]
    async with running(await connect(), [agent]), RpcClient(await connect()) as client:
        replies = await asyncio.gather(
            *(client.send(agent.name, "echo", payload, timeout_s=20) for payload in payloads)
        )
        assert client.pending_calls == 0
        assert client.late_replies == 0
    assert [reply.error for reply in replies] == [None] * 400
    assert [reply.data for reply in replies] == payloads
    assert len({reply.correlation_id for reply in replies}) == 400


@pytest.mark.parametrize("concurrency", [None, 3])
async def test_send_many_returns_replies_in_request_order(
    connect: Connect, unique: Unique, concurrency: int | None
) -> None:
    """send_many keeps request order although later requests finish first; the limit holds."""
    agent = Echo(name=unique("echo"))
    batch = [
        Request(agent.name, "echo", {"i": i, "delay_s": (12 - i) * 0.01}, timeout_s=10)
        for i in range(12)
    ]
    async with running(await connect(), [agent]), RpcClient(await connect()) as client:
        replies = await client.send_many(batch, concurrency=concurrency)
    assert [reply.data for reply in replies] == [item.payload for item in batch]
    if concurrency is None:
        assert agent.max_active > 3  # all in flight together (worker concurrency is 16)
    else:
        assert agent.max_active <= concurrency


async def test_notify_is_handled_and_gets_no_reply(connect: Connect, unique: Unique) -> None:
    """Fire-and-forget: the agent runs the request and the worker publishes no reply."""
    agent = Recorder(name=unique("recorder"))
    async with running(await connect(), [agent]) as worker, RpcClient(await connect()) as client:
        await client.notify(agent.name, "record", {"n": 7})
        async with asyncio.timeout(5):
            await agent.handled.wait()
        await wait_until(lambda: worker.stats.acked_without_reply == 1, what="the request is acked")
        assert client.late_replies == 0
    assert agent.seen == [7]
    assert worker.stats.replied == 0


# -- error replies -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "action_name", "payload", "error"),
    [
        pytest.param("tasks", "task_archive", {}, UnknownActionError, id="UNKNOWN_ACTION"),
        pytest.param("tasks", "task_add", {"title": ""}, InvalidPayloadError, id="INVALID_PAYLOAD"),
        pytest.param("tasks", "task_get", {"id": "999"}, NotFoundError, id="NOT_FOUND"),
        pytest.param("faulty", "stall", {}, ActionTimeoutError, id="TIMEOUT"),
        pytest.param("faulty", "crash", {}, InternalError, id="INTERNAL_ERROR"),
        pytest.param("nobody", "anything", {}, NoRouteError, id="NO_ROUTE"),
    ],
)
async def test_failed_request_gets_its_code_and_call_raises_its_class(
    connect: Connect,
    unique: Unique,
    target: str,
    action_name: str,
    payload: dict[str, Any],
    error: type[AgentError],
) -> None:
    """A real request that fails is answered with its stable code; call() raises its class."""
    tasks, faulty = TaskManager(name=unique("tasks")), Faulty(name=unique("faulty"))
    agent = {"tasks": tasks.name, "faulty": faulty.name, "nobody": unique("nobody")}[target]
    async with running(await connect(), [tasks, faulty]), RpcClient(await connect()) as client:
        reply = await client.send(agent, action_name, payload, timeout_s=10)
        with pytest.raises(error) as raised:
            await client.call(agent, action_name, payload, timeout_s=10)
    assert reply.code == error.code
    assert raised.value.code == error.code


async def test_invalid_payload_reply_lists_the_field_errors(
    connect: Connect, unique: Unique
) -> None:
    """A schema failure is INVALID_PAYLOAD with one {loc, msg, type} per field in details."""
    agent = TaskManager(name=unique("tasks"))
    async with running(await connect(), [agent]), RpcClient(await connect()) as client:
        reply = await client.send(agent.name, "task_add", {"title": 5, "colour": "red"})
    assert reply.error is not None
    assert reply.error.code == ErrorCode.INVALID_PAYLOAD
    details = reply.error.details
    assert {(tuple(item["loc"]), item["type"]) for item in details} == {
        (("title",), "string_type"),
        (("colour",), "extra_forbidden"),
    }
    assert all(item["msg"] for item in details)


async def test_internal_error_reply_hides_the_exception(
    connect: Connect, unique: Unique, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler's RuntimeError is INTERNAL_ERROR on the wire; its text goes only to the log."""
    agent = Faulty(name=unique("faulty"))
    transport = await connect()
    inbox, replies = await reply_inbox(transport)
    async with running(await connect(), [agent]):
        await transport.publish(
            request(agent.name, b"{}", type="crash", correlation_id="c1", reply_to=inbox),
            mandatory=True,
            timeout_s=5,
        )
        raw = await asyncio.wait_for(replies.get(), timeout=5)
    text = raw.body.decode()
    body = json.loads(text)
    assert body["ok"] is False
    assert body["error"]["code"] == ErrorCode.INTERNAL_ERROR
    assert set(body["error"]) <= {"code", "message", "details"}
    for leak in (SECRET, "RuntimeError", "Traceback", "File "):
        assert leak not in text
    assert any(r.exc_info and SECRET in str(r.exc_info[1]) for r in caplog.records)


async def test_slow_handler_is_answered_timeout_by_the_worker(
    connect: Connect, unique: Unique
) -> None:
    """A handler over its @action timeout_s is cut off and the worker replies TIMEOUT."""
    agent = Faulty(name=unique("faulty"))
    async with running(await connect(), [agent]), RpcClient(await connect()) as client:
        started = time.monotonic()
        reply = await client.send(agent.name, "stall", timeout_s=10)
        elapsed = time.monotonic() - started
    assert reply.error is not None
    assert reply.error.code == ErrorCode.TIMEOUT
    assert "0.2s" in reply.error.message  # the action's limit: the worker answered
    assert 0.2 <= elapsed < 2.0


async def test_client_times_out_when_no_reply_comes(connect: Connect, unique: Unique) -> None:
    """With no reply within timeout_s the client itself ends the call with TIMEOUT."""
    gate = Gate(name=unique("gate"))
    async with running(await connect(), [gate]), RpcClient(await connect()) as client:
        try:
            started = time.monotonic()
            reply = await client.send(gate.name, "hold", timeout_s=0.3)
            elapsed = time.monotonic() - started
            with pytest.raises(ActionTimeoutError):
                await client.call(gate.name, "hold", timeout_s=0.3)
        finally:
            gate.release.set()
    assert reply.error is not None
    assert reply.error.code == ErrorCode.TIMEOUT
    assert reply.error.message.startswith("no reply")  # the client's own timeout
    assert 0.3 <= elapsed < 1.5


async def test_aclose_ends_pending_calls_with_shutting_down(
    connect: Connect, unique: Unique
) -> None:
    """Closing the client answers its pending calls SHUTTING_DOWN at once."""
    gate = Gate(name=unique("gate"))
    async with running(await connect(), [gate]):
        client = RpcClient(await connect())
        await client.start()
        try:
            sent = asyncio.create_task(client.send(gate.name, "hold", timeout_s=20))
            called = asyncio.create_task(client.call(gate.name, "hold", timeout_s=20))
            await wait_until(lambda: gate.entered == 2, what="both requests reach the agent")
            await client.aclose()
            async with asyncio.timeout(1):
                reply = await sent
                with pytest.raises(ShuttingDownError):
                    await called
        finally:
            gate.release.set()
            await client.aclose()
    assert reply.code == ErrorCode.SHUTTING_DOWN
    assert client.pending_calls == 0


async def test_no_route_is_reported_at_once(connect: Connect, unique: Unique) -> None:
    """A call to an agent nobody serves ends NO_ROUTE in well under a second, not a timeout."""
    nobody = unique("nobody")
    async with RpcClient(await connect()) as client:
        started = time.monotonic()
        reply = await client.send(nobody, "ping", timeout_s=10)
        elapsed = time.monotonic() - started
        with pytest.raises(NoRouteError):
            await client.notify(nobody, "ping")
    assert reply.code == ErrorCode.NO_ROUTE
    assert elapsed < 1.0


async def test_unserialisable_result_is_an_internal_error(connect: Connect, unique: Unique) -> None:
    """A handler returning something that is not JSON gets INTERNAL_ERROR and is acked."""
    agent = Faulty(name=unique("faulty"))
    async with running(await connect(), [agent]) as worker, RpcClient(await connect()) as client:
        reply = await client.send(agent.name, "unserialisable", timeout_s=2)
        assert reply.code == ErrorCode.INTERNAL_ERROR
        await wait_until(lambda: worker.stats.in_flight == 0, what="the handler is done")
        assert (worker.stats.replied, worker.stats.requeued) == (1, 0)  # answered and acked


async def test_every_priority_the_client_accepts_is_served(
    connect: Connect, unique: Unique
) -> None:
    """Requests at each priority 0-9 (the range send() accepts) are all answered."""
    agent = Echo(name=unique("echo"))
    async with running(await connect(), [agent]), RpcClient(await connect()) as client:
        replies = await asyncio.gather(
            *(client.send(agent.name, "echo", priority=p, timeout_s=2) for p in range(10))
        )
    assert {p: reply.code for p, reply in enumerate(replies)} == dict.fromkeys(range(10))


# -- malformed requests --------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "properties"),
    [
        pytest.param(b"{not json", {"type": "echo"}, id="invalid-json"),
        pytest.param(b"[1, 2]", {"type": "echo"}, id="json-array"),
        pytest.param(b'"hello"', {"type": "echo"}, id="json-string"),
        pytest.param(b'{"a": 1}', {"type": "echo", "content_type": "text/plain"}, id="text-plain"),
        pytest.param(b'{"a": 1}', {}, id="no-type"),
    ],
)
async def test_malformed_request_is_answered_and_not_redelivered(
    connect: Connect,
    unique: Unique,
    broker_admin: BrokerAdmin,
    module_vhost: str,
    body: bytes,
    properties: dict[str, Any],
) -> None:
    """A bad request gets INVALID_PAYLOAD, is acked once and leaves its queue empty."""
    agent = Echo(name=unique("echo"))
    queue = Topology().agent_queue(agent.name)
    transport = await connect()
    inbox, replies = await reply_inbox(transport)
    properties = {"content_type": "application/json", **properties}
    async with running(await connect(), [agent]) as worker:
        await transport.publish(
            request(agent.name, body, correlation_id="bad-1", reply_to=inbox, **properties),
            mandatory=True,
            timeout_s=5,
        )
        reply = await asyncio.wait_for(replies.get(), timeout=5)
        await wait_until(lambda: worker.stats.in_flight == 0, what="the request is settled")
    assert reply.correlation_id == "bad-1"
    assert json.loads(reply.body)["error"]["code"] == ErrorCode.INVALID_PAYLOAD
    # Answered once, acked, and kept (once) in the dead-letter queue for inspection.
    assert worker.stats == WorkerStats(received=1, replied=1, invalid=1, dead_lettered=1)
    assert (await transport.queue_info(queue)).messages == 0
    rows = await asyncio.to_thread(broker_admin.list_queues, module_vhost)
    assert rows[queue].messages == 0  # ready + unacknowledged
    assert rows[f"{queue}.dead"].messages == 1


# -- late replies --------------------------------------------------------------------


async def test_late_reply_after_timeout_is_dropped(connect: Connect, unique: Unique) -> None:
    """A reply arriving after its call timed out is counted and dropped; nothing leaks."""
    gate = Gate(name=unique("gate"))
    async with running(await connect(), [gate]), RpcClient(await connect()) as client:
        try:
            reply = await client.send(gate.name, "hold", timeout_s=0.3)
            assert reply.code == ErrorCode.TIMEOUT
            assert client.late_replies == 0
            gate.release.set()
            await wait_until(lambda: client.late_replies == 1, what="the late reply arrives")
            assert client.pending_calls == 0
            assert await client.call(gate.name, "hold", timeout_s=5) == "released"
        finally:
            gate.release.set()
    assert client.late_replies == 1


async def test_flood_of_late_replies_leaks_no_pending_call(
    connect: Connect, unique: Unique
) -> None:
    """200 calls time out, then 200 late replies arrive: all dropped, none left pending."""
    gate = Gate(name=unique("gate"))
    settings = WorkerSettings(concurrency=256)
    async with (
        running(await connect(), [gate], settings=settings),
        RpcClient(await connect()) as client,
    ):
        try:
            calls = [
                asyncio.create_task(client.send(gate.name, "hold", timeout_s=1.5))
                for _ in range(200)
            ]
            await wait_until(lambda: gate.entered == 200, what="every request reaches the agent")
            replies = await asyncio.wait_for(asyncio.gather(*calls), timeout=5)
            assert {reply.code for reply in replies} == {ErrorCode.TIMEOUT}
            assert client.pending_calls == 0
            gate.release.set()
            await wait_until(lambda: client.late_replies == 200, what="200 late replies arrive")
            assert client.pending_calls == 0
        finally:
            gate.release.set()


# -- priorities, topology, connection loss ------------------------------------------


async def test_high_priority_requests_overtake_a_backlog(connect: Connect, unique: Unique) -> None:
    """With a backlog waiting, a one-at-a-time worker takes the high-priority requests first."""
    name = unique("recorder")
    queue = Topology().agent_queue(name)
    async with running(await connect(), [Recorder(name=name)]):
        pass  # declares and binds the agent's queue; nobody consumes it after this
    recorder = Recorder(name=name)
    transport = await connect()
    async with RpcClient(transport) as client:
        for n in range(30):
            await client.notify(name, "record", {"n": n}, priority=Priority.LOW)
        for n in range(100, 105):
            await client.notify(name, "record", {"n": n}, priority=Priority.HIGH)
    assert (await transport.queue_info(queue)).messages == 35
    async with running(await connect(), [recorder], settings=WorkerSettings(concurrency=1)):
        await wait_until(lambda: len(recorder.seen) == 35, what="the backlog is handled")
    assert set(recorder.seen[:6]) >= {100, 101, 102, 103, 104}
    assert sorted(recorder.seen) == [*range(30), *range(100, 105)]


async def test_redeclaring_with_another_max_priority_is_a_clear_error(
    connect: Connect, unique: Unique
) -> None:
    """A worker whose x-max-priority differs from the existing queue's is told how to fix it."""
    name = unique("tasks")
    async with running(await connect(), [TaskManager(name=name)]):
        pass  # declares agents.<name> with x-max-priority 9
    worker = Worker(await connect(), [TaskManager(name=name)], topology=Topology(max_priority=5))
    try:
        with pytest.raises(TopologyMismatchError) as raised:
            await worker.start()
    finally:
        await worker.stop()
    message = str(raised.value)
    assert "x-max-priority" in message
    assert Topology().agent_queue(name) in message
    assert "Topology.max_priority" in message  # the setting to align
    assert "delete_queue" in message  # or how to migrate


@pytest.mark.slow
async def test_connection_loss_fails_every_pending_call_at_once(
    fresh_vhost: str,  # first: torn down after the transports are closed
    connect: Connect,
    unique: Unique,
    broker_url: str,
    broker_admin: BrokerAdmin,
) -> None:
    """When the broker closes the client's connection, every pending call ends CONNECTION_LOST."""
    url = url_for_vhost(broker_url, fresh_vhost)
    gate = Gate(name=unique("gate"))
    ended: list[float] = []
    client_transport = await connect(url)
    async with running(await connect(url), [gate]), RpcClient(client_transport) as client:
        try:
            calls = [
                asyncio.create_task(client.send(gate.name, "hold", timeout_s=30)) for _ in range(10)
            ]
            for call in calls:
                call.add_done_callback(lambda _: ended.append(time.monotonic()))
            await wait_until(lambda: gate.entered == 10, what="every request reaches the agent")
            closed = await asyncio.to_thread(broker_admin.close_connections, fresh_vhost)
            replies = await asyncio.wait_for(asyncio.gather(*calls), timeout=10)
            assert client.pending_calls == 0
            # ...and the client comes back by itself (its worker here does not).
            await wait_until(lambda: client_transport.reconnects == 1, what="the client reconnects")
        finally:
            gate.release.set()
    assert closed == 4  # the client's and the worker's publish + consume connections
    assert {reply.code for reply in replies} == {ErrorCode.CONNECTION_LOST}
    assert max(ended) - min(ended) < 0.1  # together, not one timeout after another
