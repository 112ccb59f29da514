"""Consumer recovery: every consumer of the library has a path that notices its end,
and the recovery owner's bounds (backoff, escalation) hold."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from typing import Any

import pytest

from amqp_agents.errors import LifecycleError
from amqp_agents.transport.base import Delivery, EndReason, QueueSpec
from amqp_agents.transport.memory import InMemoryBroker, InMemoryTransport
from amqp_agents.transport.recovery import AttachmentState, Recovery

PACKAGE = Path(__file__).resolve().parents[2] / "amqp_agents"


def _consume_calls() -> list[tuple[str, int, bool]]:
    """(module, line, passes on_end) of every ``<x>.consume(...)`` call in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "consume"
            ):
                has_end = any(keyword.arg == "on_end" for keyword in node.keywords)
                found.append((str(path.relative_to(PACKAGE)), node.lineno, has_end))
    return found


def test_every_consumer_the_library_starts_notices_its_end() -> None:
    """A ``consume`` without ``on_end`` would be a consumer that can end silently."""
    calls = _consume_calls()
    assert calls, "the scan found no consume() call: it is broken"
    assert [call for call in calls if not call[2]] == []
    # Long-lived consumers go through the one recovery owner; only the dead-letter
    # reader (short-lived, it stops waiting when its consumer ends) consumes directly,
    # and the traced transport forwards each consume (with its on_end) to the one below.
    assert sorted({module for module, _line, _end in calls}) == [
        "runtime/dead_letters.py",
        "tracing/transport.py",
        "transport/recovery.py",
    ]


async def _nothing(_delivery: Delivery) -> None:
    return None


async def test_a_lost_connection_that_will_not_come_back_escalates_at_once() -> None:
    broker = InMemoryBroker()
    transport = InMemoryTransport(broker)
    await transport.connect()
    escalations: list[str] = []
    recovery = Recovery(transport, escalate_after_s=60, on_escalate=escalations.append)
    name = await transport.declare_queue(QueueSpec(name="q"))

    async def declare() -> str:
        return name

    attachment = await recovery.attach(declare, _nothing, prefetch=1, label="q")
    transport.simulate_connection_loss(will_reconnect=False)
    assert attachment.state is AttachmentState.REATTACHING
    assert attachment.end is not None
    assert attachment.end.reason is EndReason.CONNECTION_LOST
    assert len(escalations) == 1
    assert "will not come back" in escalations[0]
    assert not recovery.stuck  # liveness waits for the bound; the owner restarts first
    await recovery.aclose()


async def test_a_consumer_that_keeps_failing_escalates_once_after_the_bound() -> None:
    broker = InMemoryBroker()
    transport = InMemoryTransport(broker)
    await transport.connect()
    escalated = asyncio.Event()
    reasons: list[str] = []

    def on_escalate(why: str) -> None:
        reasons.append(why)
        escalated.set()

    recovery = Recovery(
        transport,
        backoff_initial_s=0.01,
        backoff_max_s=0.02,
        escalate_after_s=0.2,
        on_escalate=on_escalate,
    )
    tries = 0

    async def declare() -> str:
        nonlocal tries
        tries += 1
        return await transport.declare_queue(QueueSpec(name="q"))

    attachment = await recovery.attach(declare, _nothing, prefetch=1, label="q")
    broker.delete_queue("q")
    # The queue comes back with other arguments: every re-attach is refused (406).
    await transport.declare_queue(QueueSpec(name="q", arguments={"x-max-priority": 3}))
    await asyncio.wait_for(escalated.wait(), 5)
    assert recovery.stuck
    assert attachment.last_error is not None
    assert "different arguments" in attachment.last_error
    assert len(reasons) == 1
    assert "not re-attached within 0.2s" in reasons[0]
    # Bounded: with 10-20 ms backoff, about 10-40 tries in 0.2 s; a hot loop does more.
    assert 2 < tries < 100
    back = asyncio.Event()
    recovery.watch(lambda _attachment: back.set() if recovery.all_attached else None)
    broker.delete_queue("q")
    await asyncio.wait_for(back.wait(), 5)
    assert recovery.gone() == []  # hence no longer stuck
    await recovery.aclose()


@pytest.mark.parametrize("failures", [1, 2, 5, 30])
def test_backoff_is_full_jitter_within_its_ceiling(failures: int) -> None:
    recovery = Recovery(InMemoryTransport(), backoff_initial_s=0.1, backoff_max_s=5)
    ceiling = min(5.0, 0.1 * 2 ** (failures - 1))
    delays = [recovery.backoff(failures) for _ in range(200)]
    assert all(0 <= delay <= ceiling for delay in delays)
    assert max(delays) > ceiling / 2  # spread over the range, not a constant


async def test_a_closed_recovery_attaches_nothing() -> None:
    transport = InMemoryTransport()
    await transport.connect()
    recovery = Recovery(transport)
    await recovery.aclose()

    async def declare() -> str:
        raise AssertionError("not called")

    kwargs: dict[str, Any] = {"prefetch": 1, "label": "q"}
    with pytest.raises(LifecycleError):
        await recovery.attach(declare, _nothing, **kwargs)
