"""Steady load on the cluster, accounted like the fault tests: nothing lost, nobody hung.

A worker under its :class:`~amqp_agents.runtime.supervisor.Supervisor` (the transport
reconnects, the worker re-attaches in place: as ``amqp-agents run`` builds it) serves one
agent on one node; a client on another node keeps up a paced stream of calls (marked
``idempotent``: the agent only records ids) and of confirmed fire-and-forget requests.
:class:`Ledger` classifies every one:

* a call ends ``ok``, or with an error reply whose code the test allows, by its
  deadline (a call still running a second after it is *hung*);
* a fire-and-forget request is *confirmed* (the broker took it) or *unknown* (the
  publish failed or timed out); every confirmed one must be handled (else *lost*).

The figures a node-loss test prints come from :meth:`Ledger.figures`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

from amqp_agents.config import ConnectionSettings, WorkerSettings
from amqp_agents.errors import AmqpAgentsError
from amqp_agents.models.topology import Topology
from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.supervisor import Supervisor
from amqp_agents.runtime.worker import Worker
from amqp_agents.transport.base import QueueInfo, Transport
from amqp_agents.transport.rabbitmq import RabbitTransport
from tests.agents_for_tests import Tap
from tests.integration.test_faults import Recorder
from tests.support import wait_until

CALL_TIMEOUT_S = 5.0
CALLERS = 6
CALL_PAUSE_S = 0.2
"""Each caller pauses this long between calls: about 30 calls/s in all."""
NOTIFY_PAUSE_S = 0.1
"""About 10 fire-and-forget requests/s."""
PUBLISH_TIMEOUT_S = 10.0
"""Above the call timeout: a call that cannot be published times out at its deadline."""


def connection_settings(url: str, **overrides: Any) -> ConnectionSettings:
    """Fast heartbeats and reconnects, so the figures are the cluster's, not our waits."""
    return ConnectionSettings.model_validate(
        {
            "url": url,
            "heartbeat_s": 2,
            "connect_timeout_s": 3,
            "publish_timeout_s": PUBLISH_TIMEOUT_S,
            "reconnect_initial_s": 0.1,
            "reconnect_max_s": 1.0,
            **overrides,
        }
    )


@dataclass
class Call:
    started: float
    ended: float
    outcome: str
    """``ok`` or the error reply's code."""


@dataclass
class Ledger:
    """What every operation came to."""

    started: float = field(default_factory=time.monotonic)
    calls: list[Call] = field(default_factory=list)
    hung: int = 0
    confirmed: set[int] = field(default_factory=set)
    unknown: set[int] = field(default_factory=set)
    unknown_reasons: Counter[str] = field(default_factory=Counter)

    def first_ok_after(self, moment: float) -> float | None:
        """When the first call that began at or after ``moment`` was answered ok."""
        return min(
            (c.ended for c in self.calls if c.outcome == "ok" and c.started >= moment),
            default=None,
        )

    def longest_gap(self) -> float:
        """The longest time between two ok answers (the outage as callers saw it)."""
        ends = sorted(c.ended for c in self.calls if c.outcome == "ok")
        return max((b - a for a, b in itertools.pairwise(ends)), default=0.0)

    def outcomes(self) -> Counter[str]:
        return Counter(c.outcome for c in self.calls)


@dataclass
class Rig:
    """The worker's supervisor, the client, the agent, and where each connects."""

    agent: Recorder
    client: RpcClient
    supervisor: Supervisor
    supervising: asyncio.Task[None]
    """The supervisor's run: done only if it ended (a crash, before the test stops it)."""
    taps: list[Tap]
    topology: Topology
    inspect_urls: list[str]
    ledger: Ledger = field(default_factory=Ledger)

    @property
    def queue(self) -> str:
        return self.topology.agent_queue(self.agent.name)

    async def queue_info(self) -> QueueInfo:
        """The broker's view of the agent queue, through the first node that answers."""
        last: Exception | None = None
        for url in self.inspect_urls:
            try:
                async with RabbitTransport(connection_settings(url, reconnect=False)) as inspect:
                    return await inspect.queue_info(self.queue)
            except AmqpAgentsError as exc:
                last = exc
        raise AssertionError(f"no node tells about {self.queue}: {last!r}")

    def redelivered(self) -> set[int]:
        """Ids the worker got with ``redelivered`` set."""
        return {
            json.loads(envelope.body)["id"]
            for tap in self.taps
            for queue, envelope in tap.seen
            if queue == self.queue and envelope.redelivered
        }

    def worker_connections(self) -> int:
        """Transports the supervisor opened (1 + its restarts)."""
        return len(self.taps)


@contextlib.asynccontextmanager
async def serving(
    worker_url: str,
    client_url: str,
    *,
    name: str,
    topology: Topology,
    inspect_urls: list[str],
    reattach_limit_s: float = 30.0,
) -> AsyncIterator[Rig]:
    """A supervised worker on ``worker_url`` and a started client on ``client_url``."""
    agent = Recorder(name=name)
    taps: list[Tap] = []

    def open_transport() -> Transport:
        tap = Tap(RabbitTransport(connection_settings(worker_url, reconnect=True)))
        taps.append(tap)
        return cast("Transport", tap)

    def build_worker(transport: Transport) -> Worker:
        return Worker(
            transport,
            [agent],
            topology=topology,
            settings=WorkerSettings(
                concurrency=16, grace_period_s=2, reattach_limit_s=reattach_limit_s
            ),
            publish_timeout_s=PUBLISH_TIMEOUT_S,
        )

    supervisor = Supervisor(open_transport, build_worker, backoff_initial_s=0.1, backoff_max_s=2.0)
    stop = asyncio.Event()
    running = asyncio.create_task(supervisor.run(stop))
    client_transport = RabbitTransport(connection_settings(client_url))
    client = RpcClient(client_transport, topology=topology, publish_timeout_s=PUBLISH_TIMEOUT_S)
    try:
        await client_transport.connect()
        deadline = time.monotonic() + 30
        while not supervisor.is_ready:
            if running.done():
                running.result()  # its error
                raise AssertionError("the supervisor ended before the worker was ready")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker not ready: {supervisor.not_ready_reason()}")
            await asyncio.sleep(0.05)
        await client.start()
        yield Rig(agent, client, supervisor, running, taps, topology, inspect_urls)
    finally:
        stop.set()
        done, _ = await asyncio.wait({running}, timeout=20)
        if not done:
            running.cancel()
            await asyncio.wait({running}, timeout=10)
        with contextlib.suppress(Exception):
            await client.aclose()
        await client_transport.aclose()
        if done:
            running.result()  # the supervisor's own failure fails the test


async def load(rig: Rig, going: asyncio.Event) -> None:
    """Paced calls and fire-and-forget requests until ``going`` is cleared."""
    ledger = rig.ledger
    ids = iter(range(1, 10**9))

    async def caller() -> None:
        while going.is_set():
            await call_once(rig, next(ids))
            await asyncio.sleep(CALL_PAUSE_S)

    async def notifier() -> None:
        while going.is_set():
            n = next(ids)
            try:
                await rig.client.notify(rig.agent.name, "work", {"id": n}, timeout_s=120)
            except AmqpAgentsError as exc:
                ledger.unknown.add(n)
                ledger.unknown_reasons[type(exc).__name__] += 1
            else:
                ledger.confirmed.add(n)
            await asyncio.sleep(NOTIFY_PAUSE_S)

    async with asyncio.TaskGroup() as group:
        for _ in range(CALLERS):
            group.create_task(caller())
        group.create_task(notifier())


async def call_once(rig: Rig, n: int) -> None:
    """One idempotent call of ``work(n)``, entered in the ledger (hung past its deadline)."""
    began = time.monotonic()
    sending = rig.client.send(
        rig.agent.name, "work", {"id": n}, timeout_s=CALL_TIMEOUT_S, idempotent=True
    )
    try:
        async with asyncio.timeout(CALL_TIMEOUT_S + 1.0):
            response = await sending
    except TimeoutError:
        rig.ledger.hung += 1
        return
    code = "ok" if response.error is None else str(response.error.code)
    rig.ledger.calls.append(Call(began, time.monotonic(), code))


@contextlib.asynccontextmanager
async def under_load(rig: Rig) -> AsyncIterator[None]:
    """Keep the load up for the block; it ends (every call ended or hung) after."""
    going = asyncio.Event()
    going.set()
    loading = asyncio.create_task(load(rig, going))
    try:
        yield
    finally:
        going.clear()
        await asyncio.wait_for(loading, CALL_TIMEOUT_S + 5)


async def account(rig: Rig, *, fault_began: float, **extra: Any) -> dict[str, Any]:
    """Drain (every confirmed request handled, the queue empty with one consumer), then
    the run's figures (printed by the tests, with ``-s``)."""
    ledger, handled = rig.ledger, rig.agent.handled

    def all_handled() -> bool:
        return ledger.confirmed <= set(handled)

    await wait_until(
        all_handled,
        timeout_s=30,
        what=lambda: f"all confirmed requests handled ({len(ledger.confirmed - set(handled))} not)",
    )

    async def settled() -> bool:
        info = await rig.queue_info()
        return info.consumers == 1 and info.messages == 0

    await wait_until(settled, timeout_s=30, interval_s=0.5, what="the queue empty, consumer back")
    first = ledger.first_ok_after(fault_began)
    return {
        "calls": len(ledger.calls),
        "outcomes": dict(ledger.outcomes()),
        "hung": ledger.hung,
        "requests confirmed": len(ledger.confirmed),
        "requests unknown": len(ledger.unknown),
        "unknown because": dict(ledger.unknown_reasons),
        "requests lost": len(ledger.confirmed - set(handled)),
        "handled twice": sum(1 for c in handled.values() if c > 1),
        "redelivered": len(rig.redelivered()),
        "first reply after the fault began s": None
        if first is None
        else round(first - fault_began, 2),
        "longest gap between ok replies s": round(ledger.longest_gap(), 2),
        "worker connections": rig.worker_connections(),
        **extra,
    }


def timeouts_in_the_fault(ledger: Ledger, *, recovered: float) -> list[Call]:
    """Calls that failed though they began after calls flowed again (should be none)."""
    return [c for c in ledger.calls if c.outcome != "ok" and c.started > recovered]
