"""Agents that worker subprocesses load, and the helpers that run ``amqp-agents`` for tests.

A subprocess worker runs ``amqp-agents --url URL run tests.agents_for_tests:recorder`` and
is configured through environment variables (read when the CLI loads the target):

* ``AAT_AGENT_NAME``: the agent's name (unique per test);
* ``AAT_RECORD_PATH``: a file each handled request's ``id`` is appended to, one per line,
  when the handler finishes (before the reply and the ack);
* ``AAT_DELAY_MS``: ``"MIN,MAX"``, how long ``work`` takes (uniformly random).

``hold`` records its id when it starts and stays in flight until the process receives
SIGUSR1, which lets a test keep a request in flight across a SIGTERM.

The console script does not put the working directory on ``sys.path``, so
:func:`cli_env` adds the project root to ``PYTHONPATH`` for ``tests`` to be importable.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import pytest
from pydantic import BaseModel

from amqp_agents.config import RetryPolicy, WorkerSettings
from amqp_agents.errors import (
    InvalidPayloadError,
    NotFoundError,
    QueueNotFoundError,
    Retry,
    RetryableError,
    TopologyMismatchError,
)
from amqp_agents.models.envelope import Envelope
from amqp_agents.models.messages import AgentResponse
from amqp_agents.models.topology import Topology
from amqp_agents.models.wire import decode_reply
from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.agent import Agent, action
from amqp_agents.runtime.dead_letters import DeadLetter, DeadLetters
from amqp_agents.runtime.worker import Worker
from amqp_agents.transport.base import (
    ConsumerHandle,
    Delivery,
    DeliveryHandler,
    EndCallback,
    QueueSpec,
    Transport,
)
from tests.support import wait_until

ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).with_name("amqp-agents"))


class Work(BaseModel):
    """Payload of ``work``: the request's id, recorded when handled."""

    id: int


class Recorder(Agent):
    """Records every handled ``work`` request's id; ``hold`` stays in flight until SIGUSR1."""

    name = "recorder"

    def __init__(self, *, name: str, record_path: str, delay_ms: tuple[float, float]) -> None:
        super().__init__(name=name)
        self._record_path = record_path
        self._delay_ms = delay_ms
        self._fd = -1
        self._released = asyncio.Event()

    async def start(self) -> None:
        self._fd = os.open(self._record_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self._released.set)
        await super().start()

    async def shutdown(self) -> None:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        await super().shutdown()

    @action("work")
    async def work(self, payload: Work) -> Work:
        """Take a while, then record the id (one small O_APPEND write: atomic)."""
        await asyncio.sleep(random.uniform(*self._delay_ms) / 1000)
        os.write(self._fd, f"{payload.id}\n".encode())
        return payload

    @action("hold")
    async def hold(self, payload: Work) -> Work:
        """Record the id, then stay in flight until the process gets SIGUSR1 (at most 30 s)."""
        os.write(self._fd, f"{payload.id}\n".encode())
        async with asyncio.timeout(30):
            await self._released.wait()
        return payload


def recorder() -> list[Agent]:
    """The target ``tests.agents_for_tests:recorder``, configured from the environment."""
    low, high = (float(x) for x in os.environ.get("AAT_DELAY_MS", "5,20").split(","))
    return [
        Recorder(
            name=os.environ["AAT_AGENT_NAME"],
            record_path=os.environ["AAT_RECORD_PATH"],
            delay_ms=(low, high),
        )
    ]


# -- running the CLI -------------------------------------------------------------------


def cli_env(*, pythonpath: bool = True, **extra: str) -> dict[str, str]:
    """The environment for an ``amqp-agents`` subprocess: no inherited broker settings."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key != "AMQP_URL" and not key.startswith(("AMQP_AGENTS_", "AAT_"))
    }
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def read_ids(path: Path) -> list[int]:
    """The ids a :class:`Recorder` wrote to ``path`` (complete lines only)."""
    if not path.exists():
        return []
    text = path.read_text()
    return [int(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


class CliProcess:
    """A running ``amqp-agents`` subprocess; stdout and stderr go to files.

    Always end it with :meth:`close` (in a ``finally``): it kills a process that is
    still running after a bounded wait.
    """

    def __init__(self, args: list[str], *, env: dict[str, str], log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        stem = f"cli-{time.monotonic_ns()}"
        self.stdout_path = log_dir / f"{stem}.out"
        self.stderr_path = log_dir / f"{stem}.err"
        self._files: list[IO[bytes]] = [self.stdout_path.open("wb"), self.stderr_path.open("wb")]
        self.proc = subprocess.Popen(
            [CLI, *args], cwd=ROOT, env=env, stdout=self._files[0], stderr=self._files[1]
        )

    def output(self) -> str:
        """Everything written to stdout and stderr so far."""
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(
            errors="replace"
        )

    def running(self) -> bool:
        """True while the process runs; an ``AssertionError`` with its output once it exited."""
        code = self.proc.poll()
        if code is not None:
            raise AssertionError(f"amqp-agents exited early with {code}:\n{self.output()}")
        return True

    def terminate(self) -> None:
        """Send SIGTERM."""
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> int:
        """The exit code; ``subprocess.TimeoutExpired`` if still running after ``timeout_s``."""
        return self.proc.wait(timeout=timeout_s)

    async def await_exit(self, timeout_s: float) -> int:
        """:meth:`wait` off the event loop."""
        return await asyncio.to_thread(self.proc.wait, timeout_s)

    def close(self) -> None:
        """Kill the process if it still runs, reap it, close the log files."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        finally:
            for file in self._files:
                file.close()


def alive(pid: int) -> bool:
    """Whether a process with this pid exists (a child not yet reaped counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def free_port() -> int:
    """A port nothing listens on right now (for a probe server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli(
    *args: str, env: dict[str, str], timeout_s: float = 20.0, module: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run ``amqp-agents ARGS`` (or ``python -m amqp_agents ARGS``) to completion."""
    command = [sys.executable, "-m", "amqp_agents"] if module else [CLI]
    return subprocess.run(
        [*command, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


# -- retries and dead letters (tests/unit/test_retries.py, tests/integration/test_retries.py)


class Item(BaseModel):
    """Payload of the :class:`Flaky` actions."""

    id: int


class Flaky(Agent):
    """Fails on demand; every handler call is counted per action (``calls``) and logged.

    * ``poison``: always raises ``RetryableError("the ledger is down")``;
    * ``echo``: answers its payload;
    * ``later``: the first call per id raises ``Retry(delay_s=retry_delay_s)``, then answers;
    * ``flaky``: raises ``RetryableError`` for the first ``failures`` calls per id, then answers;
    * ``broken``: raises ``RuntimeError`` (a bug) until ``fixed`` is set, then answers;
    * ``buggy``: raises ``ValueError`` for the first ``failures`` calls per id, then answers;
    * ``missing`` / ``refuse``: raise ``NotFoundError`` / ``InvalidPayloadError``.
    """

    name = "flaky"

    def __init__(self, *, name: str, retry_delay_s: float | None = None, failures: int = 2) -> None:
        super().__init__(name=name)
        self.retry_delay_s = retry_delay_s
        self.failures = failures
        self.fixed = False
        self.calls: Counter[str] = Counter()
        self.log: list[tuple[str, int, float]] = []
        """(action, id, time.monotonic()) of every handler call, in call order."""
        self.answered: list[tuple[str, int]] = []
        """(action, id) of every call that returned a result."""

    def _called(self, action_name: str, payload: Item) -> int:
        self.calls[action_name] += 1
        self.log.append((action_name, payload.id, time.monotonic()))
        return sum(1 for a, i, _t in self.log if a == action_name and i == payload.id)

    def _answer(self, action_name: str, payload: Item) -> Item:
        self.answered.append((action_name, payload.id))
        return payload

    @action("poison")
    async def poison(self, payload: Item) -> Item:
        self._called("poison", payload)
        raise RetryableError("the ledger is down")

    @action("echo")
    async def echo(self, payload: Item) -> Item:
        self._called("echo", payload)
        return self._answer("echo", payload)

    @action("later")
    async def later(self, payload: Item) -> Item:
        if self._called("later", payload) == 1:
            raise Retry("come back later", delay_s=self.retry_delay_s)
        return self._answer("later", payload)

    @action("flaky")
    async def flaky(self, payload: Item) -> Item:
        if self._called("flaky", payload) <= self.failures:
            raise RetryableError("try again")
        return self._answer("flaky", payload)

    @action("broken")
    async def broken(self, payload: Item) -> Item:
        self._called("broken", payload)
        if not self.fixed:
            raise RuntimeError("a bug in the handler")
        return self._answer("broken", payload)

    @action("buggy")
    async def buggy(self, payload: Item) -> Item:
        if self._called("buggy", payload) <= self.failures:
            raise ValueError("an unexpected failure")
        return self._answer("buggy", payload)

    @action("missing")
    async def missing(self, payload: Item) -> Item:
        self._called("missing", payload)
        raise NotFoundError(f"no item {payload.id}")

    @action("refuse")
    async def refuse(self, payload: Item) -> Item:
        self._called("refuse", payload)
        raise InvalidPayloadError("this item is not acceptable")


class Crash(BaseModel):
    """Payload of :class:`Crasher`'s ``work``."""

    id: int
    crash: bool = False


class Crasher(Agent):
    """``work`` records its id in ``AAT_RECORD_PATH``, then kills the process if ``crash``."""

    name = "crasher"

    def __init__(self, *, name: str, record_path: str) -> None:
        super().__init__(name=name)
        self._record_path = record_path

    @action("work")
    async def work(self, payload: Crash) -> Crash:
        fd = os.open(self._record_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{payload.id}\n".encode())
        finally:
            os.close(fd)
        if payload.crash:
            os._exit(1)  # like a segfault or the OOM killer: no cleanup, no ack
        return payload


def crasher() -> list[Agent]:
    """The target ``tests.agents_for_tests:crasher`` (``AAT_AGENT_NAME``, ``AAT_RECORD_PATH``)."""
    return [Crasher(name=os.environ["AAT_AGENT_NAME"], record_path=os.environ["AAT_RECORD_PATH"])]


@dataclass
class Journal:
    """What the handlers of a cancellation test did (shared by its agents and workers)."""

    finished: list[int] = field(default_factory=list)
    """Ids of ``work``/``hold`` requests whose handler returned, in order."""
    started: list[int] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    """``hold`` waits for it."""
    on_finish: Callable[[int], None] | None = None


def data_of(result: object) -> object:
    """A call's data: a reply's (which must be ok), or each one's of a batch."""
    if isinstance(result, AgentResponse):
        assert result.ok, result
        return result.data
    if isinstance(result, list):
        return [data_of(item) for item in result]
    return result


class Tap:
    """A transport that records every delivery it hands to a consumer, then passes it on.

    Wraps any :class:`~amqp_agents.transport.base.Transport` (composition: every other
    attribute is the wrapped transport's), so a test sees the properties and headers
    of each delivery a worker got, on either broker.
    """

    def __init__(self, inner: Transport) -> None:
        self._inner = inner
        self.seen: list[tuple[str, Envelope]] = []
        """(queue, envelope) of every delivery, in arrival order."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def is_connected(self) -> bool:
        return self._inner.is_connected

    async def consume(
        self,
        queue: str,
        handler: DeliveryHandler,
        *,
        prefetch: int,
        no_ack: bool = False,
        on_end: EndCallback | None = None,
    ) -> ConsumerHandle:
        async def tapped(delivery: Delivery) -> None:
            self.seen.append((queue, delivery.envelope))
            await handler(delivery)

        return await self._inner.consume(
            queue, tapped, prefetch=prefetch, no_ack=no_ack, on_end=on_end
        )

    def deliveries(self, queue: str, action_name: str | None = None) -> list[Envelope]:
        """Envelopes delivered from ``queue`` (of one action, if given), in order."""
        return [
            e for q, e in self.seen if q == queue and (action_name is None or e.type == action_name)
        ]


@dataclass
class Rig:
    """A worker (on a :class:`Tap`) for one agent, a client, and a transport to inspect with."""

    agent: Flaky
    policy: RetryPolicy
    worker: Worker
    client: RpcClient
    tap: Tap
    inspect: Transport
    topology: Topology = field(default_factory=Topology)

    @property
    def queue(self) -> str:
        """The agent's work queue."""
        return self.topology.agent_queue(self.agent.name)

    @property
    def dead_queue(self) -> str:
        """The agent's dead-letter queue."""
        return self.topology.agent_dead_letter_queue(self.agent.name)

    async def ready(self, queue: str) -> int:
        """Ready messages in ``queue``."""
        return (await self.inspect.queue_info(queue)).messages


OpenTransport = Callable[[], Awaitable[Transport]]


@contextlib.asynccontextmanager
async def rig(
    open_transport: OpenTransport,
    agent: Flaky,
    policy: RetryPolicy,
    *,
    max_message_bytes: int = 1024 * 1024,
    topology: Topology | None = None,
) -> AsyncIterator[Rig]:
    """Run ``agent`` with ``policy`` on new transports; stop worker and client after.

    The transports belong to ``open_transport``'s owner, which closes them.
    """
    tap = Tap(await open_transport())
    inspect = await open_transport()
    worker = Worker(
        cast("Transport", tap),
        [agent],
        topology=topology,
        settings=WorkerSettings(retry=policy, action_timeout_s=10),
        max_message_bytes=max_message_bytes,
    )
    client = RpcClient(inspect)
    await client.start()
    try:
        await worker.start()
        yield Rig(
            agent=agent,
            policy=policy,
            worker=worker,
            client=client,
            tap=tap,
            inspect=inspect,
            topology=topology or Topology(),
        )
    finally:
        await worker.stop()
        await client.aclose()


async def peek_envelopes(
    transport: Transport, queue: str, count: int, *, timeout_s: float = 5.0
) -> list[Envelope]:
    """The first ``count`` messages of ``queue``, given back (``nack(requeue)``) after."""
    got: list[Delivery] = []
    enough = asyncio.Event()

    async def take(delivery: Delivery) -> None:
        got.append(delivery)
        if len(got) >= count:
            enough.set()

    consumer = await transport.consume(queue, take, prefetch=count)
    try:
        async with asyncio.timeout(timeout_s):
            await enough.wait()
    finally:
        await consumer.cancel()
        for delivery in got:
            await delivery.nack(requeue=True)
        await consumer.close()
    return [d.envelope for d in got]


# Scenarios that run on both brokers: tests/unit/test_retries.py calls them on the
# in-memory broker, tests/integration/test_retries.py on RabbitMQ, each with its rig.

FAST_BACKOFF = 0.001
"""In-process backoff for tests: retries without waiting."""
RETRY_HEADERS = ("x-attempt", "x-error-code", "x-error-message", "x-dead-lettered-at")


async def scenario_poison_is_dead_lettered(r: Rig, *, timeout_s: float) -> None:
    """Poison (always RetryableError) -> dead after exactly max_deliveries; others answered."""
    agent, client, policy = r.agent, r.client, r.policy
    started_ms = time.time() * 1000
    poison = asyncio.create_task(
        client.send(agent.name, "poison", {"id": 1}, priority=7, timeout_s=timeout_s)
    )
    await wait_until(
        lambda: agent.calls["poison"] >= policy.attempts,
        timeout_s=5,
        what="the first delivery of the poison message",
    )
    answered = 0  # other requests, answered while the poison message climbs the ladder
    while not poison.done():
        reply = await client.send(agent.name, "echo", {"id": 100 + answered}, timeout_s=5)
        assert reply.ok, reply
        answered += 1
        await asyncio.wait({poison}, timeout=0.02)  # paces the loop; returns once done
    reply = poison.result()
    assert reply.error is not None, reply
    assert (reply.error.code, reply.error.message) == ("UNAVAILABLE", "the ledger is down")
    assert answered >= 3, f"only {answered} other request(s) answered during the retries"

    assert agent.calls["poison"] == policy.max_deliveries * policy.attempts
    deliveries = r.tap.deliveries(r.queue, "poison")
    assert [(e.headers or {}).get("x-attempt") for e in deliveries] == [
        None,
        *range(2, policy.max_deliveries + 1),
    ]
    assert {e.priority for e in deliveries} == {7}
    assert r.worker.stats.retried == policy.max_deliveries - 1
    assert r.worker.stats.dead_lettered == 1
    assert await r.ready(r.dead_queue) == 1
    for delay_ms in policy.tiers_ms()[: policy.max_deliveries - 1]:
        assert await r.ready(r.topology.agent_retry_queue(agent.name, delay_ms)) == 0

    [dead] = await peek_envelopes(r.inspect, r.dead_queue, 1)
    headers = dead.headers or {}
    assert headers["x-error-code"] == "UNAVAILABLE"
    assert headers["x-error-message"] == "the ledger is down"
    assert headers["x-attempt"] == policy.max_deliveries
    assert headers["x-original-exchange"] == r.topology.requests_exchange
    assert headers["x-original-routing-key"] == agent.name
    dead_at = headers["x-dead-lettered-at"]
    assert isinstance(dead_at, int)
    assert started_ms - 1 <= dead_at <= time.time() * 1000 + 1
    assert (dead.body, dead.type, dead.priority) == (b'{"id":1}', "poison", 7)
    assert dead.correlation_id == reply.correlation_id
    assert await r.ready(r.queue) == 0
    assert len(r.tap.deliveries(r.queue, "poison")) == policy.max_deliveries  # none since


async def scenario_retry_after_delay(
    r: Rig, *, delay_s: float, tier_ms: int, timeout_s: float
) -> None:
    """Retry(delay_s) -> no in-process retry, one redelivery via the smallest tier >= delay."""
    agent = r.agent
    agent.retry_delay_s = delay_s
    reply = await r.client.send(agent.name, "later", {"id": 1}, priority=8, timeout_s=timeout_s)
    assert reply.ok, reply
    assert agent.calls["later"] == 2, "Retry must skip the in-process retries"
    first, second = (t for _a, _i, t in agent.log)
    assert second - first >= tier_ms / 1000 - 0.01, "redelivered before the tier's delay"
    assert r.worker.stats.retried == 1
    deliveries = r.tap.deliveries(r.queue, "later")
    assert [(e.headers or {}).get("x-attempt") for e in deliveries] == [None, 2]
    assert [e.priority for e in deliveries] == [8, 8]

    tier = r.topology.agent_retry_queue(agent.name, tier_ms)
    assert tier == f"agents.{agent.name}.retry.{tier_ms}"
    assert await r.ready(tier) == 0
    arguments: dict[str, Any] = {
        "x-message-ttl": tier_ms,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": r.queue,
    }
    # Redeclaring with the same arguments succeeds, with another TTL it does not.
    await r.inspect.declare_queue(QueueSpec(name=tier, arguments=arguments))
    with pytest.raises(TopologyMismatchError):
        await r.inspect.declare_queue(
            QueueSpec(name=tier, arguments={**arguments, "x-message-ttl": tier_ms + 1})
        )
    for other in r.policy.tiers_ms():
        if other != tier_ms:
            with pytest.raises(QueueNotFoundError):
                await r.inspect.queue_info(r.topology.agent_retry_queue(agent.name, other))


async def scenario_deadline_bounds_redelivery(r: Rig, *, timeout_s: float, deliveries: int) -> None:
    """Poison with tiers beyond the caller's deadline: dead-lettered, answered in time."""
    agent = r.agent
    started = time.monotonic()
    reply = await r.client.send(agent.name, "poison", {"id": 1}, timeout_s=timeout_s)
    elapsed = time.monotonic() - started
    assert reply.code == "UNAVAILABLE", reply
    assert elapsed <= timeout_s, f"answered after {elapsed:.3f}s, past the {timeout_s}s deadline"
    assert agent.calls["poison"] == deliveries * r.policy.attempts
    assert r.worker.stats.retried == deliveries - 1
    [dead] = await peek_envelopes(r.inspect, r.dead_queue, 1)
    assert (dead.headers or {})["x-attempt"] == deliveries
    assert await r.ready(r.dead_queue) == 1


async def scenario_deadline_bounds_backoff(r: Rig, *, timeout_s: float) -> None:
    """Many in-process tries with long backoffs stop before the caller's deadline."""
    started = time.monotonic()
    reply = await r.client.send(r.agent.name, "poison", {"id": 1}, timeout_s=timeout_s)
    elapsed = time.monotonic() - started
    assert reply.code == "UNAVAILABLE", reply
    assert elapsed <= timeout_s, f"answered after {elapsed:.3f}s, past the {timeout_s}s deadline"
    assert 2 <= r.agent.calls["poison"] < r.policy.attempts
    assert r.worker.stats.dead_lettered == 1


async def scenario_peek_and_replay(r: Rig) -> None:
    """peek leaves dead letters in place, in order; replay sends the oldest N back, fresh."""
    agent = r.agent
    priorities = {1: 3, 2: 5, 3: 8}
    for item, priority in priorities.items():
        reply = await r.client.send(
            agent.name, "broken", {"id": item}, priority=priority, timeout_s=5
        )
        assert reply.code == "INTERNAL_ERROR", reply
    letters = DeadLetters(r.inspect, timeout_s=5)
    assert await letters.count(agent.name) == 3

    def ids(found: list[DeadLetter]) -> list[int]:
        return [Item.model_validate_json(letter.body).id for letter in found]

    async def back_to(count: int) -> None:
        # peek gives its messages back with nacks it does not wait for: on RabbitMQ a
        # count (on another channel) right after it can lag behind, so wait, bounded.
        async def counted() -> bool:
            return await letters.count(agent.name) == count

        await wait_until(counted, timeout_s=5, what=f"{count} dead letter(s) in place")

    first = await letters.peek(agent.name, limit=10)
    assert ids(first) == [1, 2, 3]
    assert {(x.action, x.error_code, x.attempts) for x in first} == {
        ("broken", "INTERNAL_ERROR", 1)
    }
    assert all("failed" in (x.error_message or "") for x in first)
    await back_to(3)
    assert ids(await letters.peek(agent.name, limit=2)) == [1, 2]
    await back_to(3)
    assert ids(await letters.peek(agent.name, limit=10)) == [1, 2, 3]  # order kept
    await back_to(3)

    agent.fixed = True
    assert await letters.replay(agent.name, limit=2) == 2
    assert await letters.count(agent.name) == 1
    await wait_until(
        lambda: agent.answered == [("broken", 1), ("broken", 2)],
        timeout_s=5,
        what="the replayed requests to be handled",
    )
    replayed = r.tap.deliveries(r.queue, "broken")[3:]
    assert [Item.model_validate_json(e.body).id for e in replayed] == [1, 2]
    for envelope in replayed:
        headers = envelope.headers or {}
        stale = [key for key in (*RETRY_HEADERS, "x-deadline") if key in headers]
        assert not stale, f"a replayed request still has {stale}"
        assert envelope.exchange == r.topology.requests_exchange
        assert envelope.routing_key == agent.name
        assert envelope.priority == priorities[Item.model_validate_json(envelope.body).id]
    assert ids(await letters.peek(agent.name, limit=10)) == [3]
    await back_to(1)
    assert await letters.replay(agent.name, limit=5) == 1
    await wait_until(
        lambda: len(agent.answered) == 3, timeout_s=5, what="the last replayed request"
    )
    assert await letters.count(agent.name) == 0
    assert await letters.peek(agent.name) == []
    assert r.worker.stats.dead_lettered == 3  # the replays succeeded: no new dead letters


async def scenario_oversized_request(r: Rig, *, max_bytes: int) -> None:
    """A raw request over the worker's size limit: MESSAGE_TOO_LARGE, dead-lettered once."""
    replies: asyncio.Queue[Envelope] = asyncio.Queue()

    async def on_reply(delivery: Delivery) -> None:
        replies.put_nowait(delivery.envelope)

    reply_queue = await r.inspect.declare_queue(
        QueueSpec(name="", durable=False, exclusive=True, auto_delete=True)
    )
    consumer = await r.inspect.consume(reply_queue, on_reply, prefetch=0, no_ack=True)
    body = Item(id=1).model_dump_json().encode()[:-1] + b',"pad":"' + b"x" * max_bytes + b'"}'
    assert len(body) > max_bytes
    try:
        await r.inspect.publish(
            Envelope(
                body=body,
                exchange=r.topology.requests_exchange,
                routing_key=r.agent.name,
                content_type="application/json",
                type="echo",
                message_id="big-1",
                correlation_id="big-1",
                reply_to=reply_queue,
                priority=3,
            ),
            timeout_s=5,
        )
        async with asyncio.timeout(5):
            answer = await replies.get()
    finally:
        await consumer.close()
    reply = decode_reply(answer)
    assert (reply.code, reply.correlation_id) == ("MESSAGE_TOO_LARGE", "big-1"), reply
    assert r.agent.calls["echo"] == 0
    assert r.worker.stats.dead_lettered == 1
    assert await r.ready(r.dead_queue) == 1
    [dead] = await peek_envelopes(r.inspect, r.dead_queue, 1)
    headers = dead.headers or {}
    assert (headers["x-error-code"], headers["x-attempt"]) == ("MESSAGE_TOO_LARGE", 1)
    assert headers["x-original-exchange"] == r.topology.requests_exchange
    assert headers["x-original-routing-key"] == r.agent.name
    assert (dead.body, dead.correlation_id, dead.priority) == (body, "big-1", 3)
    ok = await r.client.send(r.agent.name, "echo", {"id": 2}, timeout_s=5)
    assert ok.ok, ok
    assert replies.empty()
