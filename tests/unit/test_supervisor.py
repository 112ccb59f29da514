"""The supervisor restarts workers after lost connections, and never dies of a
cancellation nobody asked for; a consumer's cancel survives a link dying under it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, cast

import pytest

from amqp_agents.errors import BrokerUnavailableError
from amqp_agents.runtime.agent import Agent, action
from amqp_agents.runtime.supervisor import Supervisor
from amqp_agents.runtime.worker import Worker
from amqp_agents.transport.base import Transport
from amqp_agents.transport.memory import InMemoryBroker, InMemoryTransport
from amqp_agents.transport.rabbit.consumer import RabbitConsumer
from tests.support import wait_until


class Echo(Agent):
    name = "echo"

    @action("echo")
    async def echo(self, payload: dict[str, Any]) -> dict[str, Any]:
        return payload


class StrayCancelWorker(Worker):
    """Its serve() ends with a CancelledError nobody asked for, as a stop did when a
    dying link's cancellation escaped the transport."""

    async def serve(self, shutdown_trigger: Callable[[], Awaitable[object]] | None = None) -> None:
        await self.start()
        await self.stop()
        raise asyncio.CancelledError


async def test_a_stray_cancellation_does_not_end_the_supervisor() -> None:
    broker = InMemoryBroker()
    built: list[Worker] = []

    def build(transport: Transport) -> Worker:
        kind = StrayCancelWorker if not built else Worker
        built.append(kind(transport, [Echo()]))
        return built[-1]

    supervisor = Supervisor(
        lambda: InMemoryTransport(broker), build, backoff_initial_s=0.01, backoff_max_s=0.01
    )
    stop = asyncio.Event()
    running = asyncio.create_task(supervisor.run(stop))

    async def ready() -> bool:
        return supervisor.is_ready

    await wait_until(ready, timeout_s=5, what="a fresh worker serving")
    assert [type(w) for w in built] == [StrayCancelWorker, Worker]
    assert supervisor.reconnects == 1
    stop.set()
    await asyncio.wait_for(running, 5)


class CannotStartWorker(Worker):
    """Its start fails as when a classic queue's node is down (a 404 'node down')."""

    async def serve(self, shutdown_trigger: Callable[[], Awaitable[object]] | None = None) -> None:
        raise BrokerUnavailableError("queue 'agents.echo' is on a node that is down")


async def test_workers_that_cannot_start_are_rebuilt_with_a_growing_pause(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each fresh worker fails at once: the supervisor keeps trying (it never gives up
    on an unavailable queue), and the backoff step grows with every one in a row."""
    broker = InMemoryBroker()
    steps: list[int] = []
    stop = asyncio.Event()
    supervisor = Supervisor(
        lambda: InMemoryTransport(broker),
        lambda t: CannotStartWorker(t, [Echo()]),
        backoff_initial_s=0.001,
        backoff_max_s=1.0,  # also the "served a while" bound: these fail at once
    )
    original = supervisor._backoff

    def recorded(failures: int) -> float:
        steps.append(failures)
        if len(steps) >= 5:
            stop.set()
        return original(failures)

    monkeypatch.setattr(supervisor, "_backoff", recorded)
    await asyncio.wait_for(supervisor.run(stop), 5)
    assert steps == [1, 2, 3, 4, 5]


async def test_cancelling_the_supervisor_still_cancels_it() -> None:
    broker = InMemoryBroker()
    supervisor = Supervisor(
        lambda: InMemoryTransport(broker), lambda t: Worker(t, [Echo()]), backoff_initial_s=0.01
    )
    running = asyncio.create_task(supervisor.run(asyncio.Event()))

    async def ready() -> bool:
        return supervisor.is_ready

    await wait_until(ready, timeout_s=5, what="the worker serving")
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(running, 5)


class _DyingUnderlay:
    """An aiormq channel whose basic.cancel is cut by the connection dying."""

    async def basic_cancel(self, tag: str, *, timeout: float) -> None:  # noqa: ASYNC109
        raise asyncio.CancelledError  # what aiormq does to RPCs pending on a dead link


class _Channel:
    is_closed = False
    close_callbacks: ClassVar[set[object]] = set()

    async def get_underlay_channel(self) -> _DyingUnderlay:
        return _DyingUnderlay()


async def test_a_consumer_cancel_cut_by_a_dying_link_returns() -> None:
    consumer = RabbitConsumer("q", cast("Any", _Channel()), None, lambda: False)
    await asyncio.wait_for(consumer.cancel(), 1)  # returns: the consumer died with the link


async def test_a_consumer_cancel_that_is_cancelled_raises() -> None:
    gate = asyncio.Event()

    class _SlowUnderlay:
        async def basic_cancel(self, tag: str, *, timeout: float) -> None:  # noqa: ASYNC109
            await gate.wait()

    class _SlowChannel(_Channel):
        async def get_underlay_channel(self) -> _SlowUnderlay:  # type: ignore[override]
            return _SlowUnderlay()

    consumer = RabbitConsumer("q", cast("Any", _SlowChannel()), None, lambda: False)
    task = asyncio.create_task(consumer.cancel())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
