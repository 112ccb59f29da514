"""The demo: the example app end to end in one process, printed as a transcript.

``amqp-agents demo`` runs it on the in-process broker (``memory://``, no RabbitMQ
needed) or on a real one (``--url amqp://...``). It shows a backlog of low-priority
requests overtaken by a high-priority one, RPC replies, events seen by a listener
and recorded by the audit agent, deliberate errors, an orchestrator calling the other
agents (and what happens when its caller's deadline runs out half-way), and a graceful
stop.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any, TextIO

from amqp_agents.events.bus import EventBus
from amqp_agents.examples.planner import Planner
from amqp_agents.examples.tasks import AuditAgent, TaskManager
from amqp_agents.models.messages import AgentResponse, ErrorCode, Event, Priority
from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.agent import on_event
from amqp_agents.runtime.worker import Worker, WorkerStats

if TYPE_CHECKING:
    from collections.abc import Callable

    from amqp_agents.config import Settings
    from amqp_agents.transport.base import Transport

__all__ = ["run_demo"]

_STEP_TIMEOUT_S = 10.0


async def run_demo(
    settings: Settings, open_transport: Callable[[], Transport], out: TextIO
) -> bool:
    """Run the demo; ``True`` if every reply was the expected one."""
    say = _Printer(out)
    worker_transport, client_transport = open_transport(), open_transport()
    await worker_transport.connect()
    await client_transport.connect()
    try:
        return await _demo(settings, worker_transport, client_transport, say)
    finally:
        await client_transport.aclose()
        await worker_transport.aclose()


async def _demo(
    settings: Settings, worker_transport: Transport, client_transport: Transport, say: _Printer
) -> bool:
    tasks, audit = TaskManager(), _SlowDiskAudit()
    # Serve one request at a time so the priority queue visibly reorders the backlog.
    worker_settings = settings.worker.model_copy(update={"concurrency": 1})

    def new_worker() -> Worker:
        return Worker(
            worker_transport, [tasks, audit], topology=settings.topology, settings=worker_settings
        )

    say.heading("1. a worker declares the queues of task_manager and audit, then pauses")
    worker = new_worker()
    await worker.start()
    await worker.stop()

    client = RpcClient(client_transport, topology=settings.topology, settings=settings.rpc)
    bus = EventBus(client_transport, topology=settings.topology)
    await client.start()
    await bus.start()
    seen: list[Event] = []
    saw_two = asyncio.Event()

    async def listen(event: Event) -> None:
        seen.append(event)
        say.line(f"   listener <- event {event.type} {json.dumps(event.payload)}")
        if len(seen) >= 2:
            saw_two.set()

    await bus.subscribe("task.#", listen)
    say.line("   a listener subscribes to 'task.#' (a private queue: broadcast)")

    say.heading("2. a backlog while nobody consumes: three LOW requests, then one HIGH")
    for title in ("low: sweep the floor", "low: water the plants", "low: sort the mail"):
        await client.notify("task_manager", "task_add", {"title": title}, priority=Priority.LOW)
        say.line(f"   -> task_add {title!r:28} priority LOW ({int(Priority.LOW)})")
    await client.notify(
        "task_manager", "task_add", {"title": "HIGH: the server is down"}, priority=Priority.HIGH
    )
    say.line(
        f"   -> task_add {'HIGH: the server is down'!r:28} priority HIGH ({int(Priority.HIGH)})"
    )

    say.heading("3. the worker starts (concurrency 1): the HIGH request is served first")
    worker = new_worker()
    planner_worker = Worker(worker_transport, [Planner()], topology=settings.topology)
    await worker.start()
    checks: list[bool] = []
    try:
        listing = await _until(
            lambda: client.call("task_manager", "task_list"),
            lambda data: len(data["tasks"]) >= 4,
        )
        say.line("   task_list, oldest first:")
        for position, task in enumerate(listing["tasks"], 1):
            say.line(f"   {position}. {task['title']}")
        checks.append(bool(listing["tasks"][0]["title"].startswith("HIGH")))

        say.heading("4. request/reply")
        added = await say.call(client, "task_manager", "task_add", {"title": "write the demo"})
        task_id = added.data["id"] if added.ok else ""
        completed = await say.call(client, "task_manager", "task_complete", {"id": task_id})
        fetched = await say.call(client, "task_manager", "task_get", {"id": task_id})
        checks += [added.ok, completed.ok, fetched.ok]

        say.heading("5. deliberate errors: each comes back as a clear error reply")
        for agent, action, payload, code in (
            ("task_manager", "task_get", {"id": "no-such-task"}, "NOT_FOUND"),
            ("task_manager", "task_add", {"title": ""}, "INVALID_PAYLOAD"),
            ("task_manager", "task_fly", {}, "UNKNOWN_ACTION"),
            ("no_such_agent", "ping", {}, "NO_ROUTE"),
        ):
            checks.append((await say.call(client, agent, action, payload)).code == code)

        say.heading("6. events: task_manager emitted them, the audit agent recorded them")
        async with asyncio.timeout(_STEP_TIMEOUT_S):
            await saw_two.wait()
        log = await _until(
            lambda: client.call("audit", "audit_log"),
            lambda data: any(e["type"] == "task.completed" for e in data["entries"]),
        )
        for entry in log["entries"]:
            say.line(f"   audit: {entry['type']} (task {entry['task_id']})")
        checks.append(bool(any(entry["type"] == "task.created" for entry in log["entries"])))

        say.heading("7. an orchestrator: planner creates tasks through task_manager")
        say.line("   (its own worker; it calls two task_add at a time, then reads audit_log)")
        await planner_worker.start()
        plan = {"titles": ["plan: book a room", "plan: invite", "plan: agenda"], "concurrency": 2}
        summary = await say.call(client, "planner", "plan_create", plan)
        checks.append(summary.ok and len(summary.data["task_ids"]) == 3)

        say.heading("8. a deadline that runs out half-way: the work nobody waits for is dropped")
        say.line("   the audit agent turns slow (0.4 s per record: a slow disk), and it shares")
        say.line("   its worker's one slot with task_manager; planner gets 0.3 s for six tasks")
        audit.record_delay_s = 0.4
        before = len((await client.call("task_manager", "task_list"))["tasks"])
        six = {"titles": [f"rush: step {n}" for n in range(1, 7)], "concurrency": 2}
        late = await say.call(client, "planner", "plan_create", six, timeout_s=0.3)

        async def expired() -> int:
            # The task_add that reached the worker too late waits behind the slow
            # record; when it gets the slot it is dropped, and counted.
            return worker.stats.expired

        await _until(expired, lambda count: count >= 1)
        audit.record_delay_s = 0.0
        made = len((await client.call("task_manager", "task_list"))["tasks"]) - before
        say.line(f"   task_manager created {made} of the 6 tasks; the rest was not done: the")
        say.line("   planner's calls in flight ended with it, the others were never sent, and")
        say.line("   a task_add that reached task_manager's worker after the deadline was")
        say.line(f"   dropped unstarted: worker.stats.expired = {worker.stats.expired}")
        checks += [late.code == ErrorCode.TIMEOUT, made < 6, worker.stats.expired >= 1]
    finally:
        say.heading("9. graceful stop: stop consuming, finish in-flight work, close")
        await bus.aclose()
        await client.aclose()
        await planner_worker.stop()
        await worker.stop()
        say.stats(worker.stats)
    return all(checks)


async def _until(
    fetch: Callable[[], Any], done: Callable[[Any], bool], timeout_s: float = _STEP_TIMEOUT_S
) -> Any:
    """Poll ``fetch()`` until ``done(result)``; bounded by ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while True:
            result = await fetch()
            if done(result):
                return result
            await asyncio.sleep(0.02)


class _SlowDiskAudit(AuditAgent):
    """The audit agent, with a disk that step 8 makes slow."""

    record_delay_s = 0.0

    @on_event("task.*", group="audit")
    async def record(self, event: Event) -> None:
        """Record the event, after the disk's delay."""
        await asyncio.sleep(self.record_delay_s)
        await super().record(event)


class _Printer:
    def __init__(self, out: TextIO) -> None:
        self._out = out

    def line(self, text: str) -> None:
        print(text, file=self._out, flush=True)

    def heading(self, text: str) -> None:
        self.line("")
        self.line(text)

    async def call(
        self,
        client: RpcClient,
        agent: str,
        action: str,
        payload: dict[str, Any],
        *,
        timeout_s: float = _STEP_TIMEOUT_S,
    ) -> AgentResponse:
        within = "" if timeout_s == _STEP_TIMEOUT_S else f" (timeout {timeout_s:g} s)"
        self.line(f"   -> {agent}.{action} {json.dumps(payload)}{within}")
        reply = await client.send(agent, action, payload, timeout_s=timeout_s)
        if reply.error is None:
            self.line(f"   <- ok {json.dumps(reply.data)}")
            return reply
        self.line(f"   <- {reply.error.code}: {reply.error.message}")
        if isinstance(reply.error.details, list):
            for detail in reply.error.details:
                if isinstance(detail, dict):
                    where = ".".join(str(part) for part in detail.get("loc", [])) or "(payload)"
                    self.line(f"      field {where}: {detail.get('msg')}")
        return reply

    def stats(self, stats: WorkerStats) -> None:
        """The second worker's counters (``worker.stats``), each said in words."""
        answered = stats.replied + stats.acked_without_reply
        others = stats.received - answered - stats.invalid - stats.expired - stats.requeued
        self.line(
            f"   worker.stats: {stats.received} deliveries received since step 3:"
            f" {stats.replied} requests answered with a reply,"
        )
        self.line(
            f"   {stats.acked_without_reply} notify() requests acked without one (the"
            f" backlog of step 2), and {others} events the audit agent recorded;"
        )
        self.line(
            f"   {stats.invalid} undecodable, {stats.expired} expired, {stats.requeued}"
            f" requeued, {stats.retried} retried, {stats.dead_lettered} dead-lettered,"
            f" {stats.in_flight} still in flight"
        )
