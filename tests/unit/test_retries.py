"""Retries and dead letters on the in-memory broker: the ladder, its bounds, replays.

The scenarios shared with ``tests/integration/test_retries.py`` (RabbitMQ) live in
``tests/agents_for_tests.py``; the rest runs through :class:`AgentHarness`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from amqp_agents.config import RetryPolicy, WorkerSettings
from amqp_agents.models.topology import Topology
from amqp_agents.testing import AgentHarness
from amqp_agents.transport.base import Transport
from amqp_agents.transport.memory import InMemoryBroker, InMemoryTransport
from tests.agents_for_tests import (
    FAST_BACKOFF,
    Flaky,
    OpenTransport,
    peek_envelopes,
    rig,
    scenario_deadline_bounds_backoff,
    scenario_deadline_bounds_redelivery,
    scenario_oversized_request,
    scenario_peek_and_replay,
    scenario_poison_is_dead_lettered,
    scenario_retry_after_delay,
)

TOPOLOGY = Topology()
AGENT = "flaky"
LADDER = RetryPolicy(
    attempts=2, backoff_initial_s=FAST_BACKOFF, redelivery_delays_s=(0.2, 0.4), max_deliveries=3
)
TIERS = RetryPolicy(
    attempts=3,
    backoff_initial_s=FAST_BACKOFF,
    redelivery_delays_s=(0.05, 0.1, 0.25, 1.0),
    max_deliveries=3,
)


@pytest.fixture
async def memory() -> AsyncIterator[OpenTransport]:
    """Opens connected transports to one fresh in-memory broker; closes them after."""
    broker = InMemoryBroker()
    opened: list[InMemoryTransport] = []

    async def open_transport() -> Transport:
        transport = InMemoryTransport(broker)
        await transport.connect()
        opened.append(transport)
        return transport

    yield open_transport
    for transport in opened:
        await transport.aclose()


def harness(agent: Flaky, policy: RetryPolicy) -> AgentHarness:
    return AgentHarness(agent, settings=WorkerSettings(retry=policy), timeout_s=5)


def queues(h: AgentHarness) -> dict[str, int]:
    """Ready messages per queue of the harness's broker (reply queues left out)."""
    return {
        name: info.messages
        for name, info in h.broker.statistics().queues.items()
        if not name.startswith("amq.gen-")
    }


# -- the ladder -------------------------------------------------------------------------


async def test_poison_message_is_dead_lettered_after_max_deliveries(
    memory: OpenTransport,
) -> None:
    """A handler that always raises RetryableError: dead after max_deliveries, others served."""
    async with rig(memory, Flaky(name=AGENT), LADDER) as r:
        await scenario_poison_is_dead_lettered(r, timeout_s=3)


async def test_retry_with_a_delay_goes_through_the_smallest_tier_that_honours_it(
    memory: OpenTransport,
) -> None:
    """Retry(delay_s=0.2): one redelivery via the 250 ms tier, none in process, priority kept."""
    async with rig(memory, Flaky(name=AGENT), TIERS) as r:
        await scenario_retry_after_delay(r, delay_s=0.2, tier_ms=250, timeout_s=3)


async def test_in_process_retries_answer_without_a_redelivery() -> None:
    """Two RetryableErrors then success, attempts=3: answered ok in one delivery, 3 calls."""
    agent = Flaky(name=AGENT, failures=2)
    policy = RetryPolicy(attempts=3, backoff_initial_s=FAST_BACKOFF, max_deliveries=3)
    async with harness(agent, policy) as h:
        assert await h.call(AGENT, "flaky", {"id": 1}) == {"id": 1}
        assert agent.calls["flaky"] == 3
        assert (h.worker.stats.received, h.worker.stats.retried) == (1, 0)
        assert h.worker.stats.dead_lettered == 0
        assert not any(".retry." in name for name in queues(h))


async def test_in_process_retries_stop_at_attempts() -> None:
    """Two RetryableErrors with attempts=2 and no redelivery: UNAVAILABLE, dead-lettered."""
    agent = Flaky(name=AGENT, failures=2)
    policy = RetryPolicy(attempts=2, backoff_initial_s=FAST_BACKOFF, max_deliveries=1)
    async with harness(agent, policy) as h:
        reply = await h.send(AGENT, "flaky", {"id": 1})
        assert reply.code == "UNAVAILABLE", reply
        assert agent.calls["flaky"] == 2
        assert queues(h)[TOPOLOGY.agent_dead_letter_queue(AGENT)] == 1


# -- what is not retried ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "payload", "code", "calls"),
    [
        ("missing", {"id": 1}, "NOT_FOUND", 1),
        ("refuse", {"id": 1}, "INVALID_PAYLOAD", 1),
        ("echo", {"id": "not a number"}, "INVALID_PAYLOAD", 0),
        ("no_such_action", {"id": 1}, "UNKNOWN_ACTION", 0),
    ],
)
async def test_agent_errors_are_answers_never_retried(
    action: str, payload: dict[str, object], code: str, calls: int
) -> None:
    """NOT_FOUND, INVALID_PAYLOAD, UNKNOWN_ACTION: answered at once, no retry, no dead letter."""
    agent = Flaky(name=AGENT)
    async with harness(agent, LADDER) as h:
        reply = await h.send(AGENT, action, payload)
        assert reply.code == code, reply
        await h.settle()
        assert agent.calls[action] == calls
        stats = h.worker.stats
        assert (stats.received, stats.retried, stats.dead_lettered) == (1, 0, 0)
        assert queues(h) == {
            TOPOLOGY.agent_queue(AGENT): 0,
            TOPOLOGY.agent_dead_letter_queue(AGENT): 0,
        }, "a retry queue was declared or a dead letter written"


async def test_unexpected_errors_are_answered_at_once_and_dead_lettered() -> None:
    """A bug (RuntimeError) with attempts=3: one call, INTERNAL_ERROR, one dead letter."""
    agent = Flaky(name=AGENT)
    async with harness(agent, LADDER) as h:
        reply = await h.send(AGENT, "broken", {"id": 1})
        assert reply.code == "INTERNAL_ERROR", reply
        assert agent.calls["broken"] == 1
        assert (h.worker.stats.retried, h.worker.stats.dead_lettered) == (0, 1)
        assert not any(".retry." in name for name in queues(h))
        transport = InMemoryTransport(h.broker)
        await transport.connect()
        try:
            [dead] = await peek_envelopes(transport, TOPOLOGY.agent_dead_letter_queue(AGENT), 1)
        finally:
            await transport.aclose()
        headers = dead.headers or {}
        assert (headers["x-error-code"], headers["x-attempt"]) == ("INTERNAL_ERROR", 1)
        assert (headers["x-original-exchange"], headers["x-original-routing-key"]) == (
            TOPOLOGY.requests_exchange,
            AGENT,
        )
        assert "a bug in the handler" not in str(headers["x-error-message"])  # log only


async def test_unexpected_errors_are_retried_when_asked() -> None:
    """retry_unexpected=True: a ValueError twice then success is answered ok after 3 calls."""
    agent = Flaky(name=AGENT, failures=2)
    policy = LADDER.model_copy(update={"attempts": 3, "retry_unexpected": True})
    async with harness(agent, policy) as h:
        assert await h.call(AGENT, "buggy", {"id": 1}) == {"id": 1}
        assert agent.calls["buggy"] == 3
        assert (h.worker.stats.retried, h.worker.stats.dead_lettered) == (0, 0)


# -- deadlines ----------------------------------------------------------------------------


async def test_redelivery_never_outlives_the_callers_deadline(memory: OpenTransport) -> None:
    """Tiers longer than the time left: dead-lettered at once, answered within 0.5 s."""
    policy = RetryPolicy(attempts=1, redelivery_delays_s=(2.0,), max_deliveries=4)
    async with rig(memory, Flaky(name=AGENT), policy) as r:
        await scenario_deadline_bounds_redelivery(r, timeout_s=0.5, deliveries=1)


async def test_redeliveries_stop_when_the_next_would_end_past_the_deadline(
    memory: OpenTransport,
) -> None:
    """0.3 s tiers, 0.5 s deadline: one redelivery, then dead-lettered and answered in time."""
    policy = RetryPolicy(attempts=1, redelivery_delays_s=(0.3,), max_deliveries=4)
    async with rig(memory, Flaky(name=AGENT), policy) as r:
        await scenario_deadline_bounds_redelivery(r, timeout_s=0.5, deliveries=2)


async def test_in_process_backoff_never_outlives_the_callers_deadline(
    memory: OpenTransport,
) -> None:
    """50 tries with backoffs up to 0.3 s and a 0.6 s deadline: stops and answers in time."""
    policy = RetryPolicy(attempts=50, backoff_initial_s=0.05, backoff_max_s=0.3, max_deliveries=1)
    async with rig(memory, Flaky(name=AGENT), policy) as r:
        await scenario_deadline_bounds_backoff(r, timeout_s=0.6)


# -- dead letters ---------------------------------------------------------------------------


async def test_dead_letters_peek_and_replay(memory: OpenTransport) -> None:
    """peek keeps dead letters in place and in order; replay(limit) sends the oldest back."""
    async with rig(memory, Flaky(name=AGENT), LADDER) as r:
        await scenario_peek_and_replay(r)


async def test_oversized_request_is_refused_and_dead_lettered(memory: OpenTransport) -> None:
    """A request over max_message_bytes: MESSAGE_TOO_LARGE reply, one dead letter."""
    async with rig(memory, Flaky(name=AGENT), LADDER, max_message_bytes=2048) as r:
        await scenario_oversized_request(r, max_bytes=2048)
