"""Hostile input on the in-memory broker: whatever arrives, the worker settles and answers once.

Also: a flood of late replies for calls that timed out is dropped and keeps memory flat.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
import tracemalloc
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from amqp_agents.models.envelope import Envelope
from amqp_agents.models.topology import Topology
from amqp_agents.models.wire import decode_reply
from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.agent import Agent, action
from amqp_agents.testing import AgentHarness
from amqp_agents.transport.base import Delivery, QueueSpec
from amqp_agents.transport.memory import InMemoryBroker, InMemoryTransport
from tests.support import wait_until

TOPOLOGY = Topology()
AGENT = "fuzzed"
MAX_EPOCH_MS = 253_402_300_799_000


class Typed(BaseModel):
    """Payload of ``typed``."""

    n: int


class Fuzzed(Agent):
    """Actions that answer, validate a schema, or fail with a bug."""

    name = AGENT

    @action("echo")
    async def echo(self, payload: dict[str, Any]) -> dict[str, Any]:
        return payload

    @action("typed")
    async def typed(self, payload: Typed) -> Typed:
        return payload

    @action("boom")
    async def boom(self, payload: dict[str, Any]) -> None:
        raise RuntimeError("a bug")


# -- hostile requests -------------------------------------------------------------------


_odd_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.lists(st.integers(), max_size=3),
)
_json_objects = st.dictionaries(
    st.text(max_size=10),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
        max_leaves=8,
    ),
    max_size=4,
).map(lambda obj: json.dumps(obj).encode())


@dataclass(frozen=True)
class Raw:
    """One request as published straight to the agent's queue."""

    body: bytes
    content_type: str | None
    type: str | None
    priority: int | None
    expiration_ms: int | None
    timestamp: int | None
    message_id: str | None
    correlation_id: str | None
    reply: bool
    """Whether it carries a ``reply_to`` (a queue of the test's own)."""
    deadline: object
    """The x-deadline header: absent, ``"past"``/``"future"`` (set when published), or odd."""
    headers: dict[str, Any]

    def envelope(self, reply_to: str | None, now_ms: int) -> Envelope:
        headers = dict(self.headers)
        if self.deadline == "past":
            headers["x-deadline"] = now_ms - 5_000
        elif self.deadline == "future":
            headers["x-deadline"] = now_ms + 60_000
        elif self.deadline != "absent":
            headers["x-deadline"] = self.deadline
        return Envelope(
            body=self.body,
            exchange="",
            routing_key=TOPOLOGY.agent_queue(AGENT),
            content_type=self.content_type,
            type=self.type,
            message_id=self.message_id,
            correlation_id=self.correlation_id,
            reply_to=reply_to,
            priority=self.priority,
            expiration_ms=self.expiration_ms,
            timestamp=self.timestamp,
            headers=headers or None,
        )

    def expired(self, now_ms: int) -> bool:
        """Whether the worker must drop it unanswered: its deadline has passed."""
        raw = {"past": now_ms - 5_000, "future": now_ms + 60_000}.get(
            self.deadline if isinstance(self.deadline, str) else "", self.deadline
        )
        valid = isinstance(raw, int) and not isinstance(raw, bool) and 0 < raw < MAX_EPOCH_MS
        return valid and raw <= now_ms  # type: ignore[operator]


raw_requests = st.builds(
    Raw,
    body=st.one_of(st.binary(max_size=300), _json_objects, st.just(b"{}")),
    content_type=st.one_of(
        st.none(),
        st.sampled_from(["application/json", "Application/JSON; charset=utf-8", "text/plain"]),
        st.text(max_size=40),
    ),
    type=st.one_of(
        st.none(),
        st.sampled_from(["echo", "typed", "boom", ""]),
        st.text(max_size=20),
        st.text(min_size=250, max_size=300),  # past AMQP's short-string limit
    ),
    priority=st.none() | st.integers(0, 255),
    expiration_ms=st.none() | st.integers(0, 10**9),
    timestamp=st.none() | st.integers(-(2**40), 2**63 - 1),
    message_id=st.none() | st.text(max_size=40),
    correlation_id=st.none() | st.text(max_size=40),
    reply=st.booleans(),
    deadline=st.one_of(st.sampled_from(["absent", "past", "future"]), _odd_values),
    headers=st.dictionaries(
        st.sampled_from(["x-attempt", "x-error-code", "x-original-exchange", "x-death", "h"]),
        _odd_values,
        max_size=3,
    ),
)


async def serve_hostile(requests: list[Raw]) -> dict[str, list[Envelope]]:
    """Publish ``requests`` to a fresh worker; check settlement, replies, and that it serves."""
    async with AgentHarness(Fuzzed(), timeout_s=2) as h:
        spy = InMemoryTransport(h.broker)
        await spy.connect()
        replies: dict[str, list[Envelope]] = {}

        async def reply_queue() -> str:
            name = await spy.declare_queue(QueueSpec(name="", exclusive=True, auto_delete=True))
            got = replies[name] = []

            async def take(delivery: Delivery) -> None:
                got.append(delivery.envelope)

            await spy.consume(name, take, prefetch=0, no_ack=True)
            return name

        try:
            expected: dict[str, int] = {}
            for request in requests:
                now_ms = int(time.time() * 1000)
                reply_to = await reply_queue() if request.reply else None
                if reply_to is not None:
                    expected[reply_to] = 0 if request.expired(now_ms) else 1
                await spy.publish(request.envelope(reply_to, now_ms), timeout_s=1)
            await h.settle()
            stats = h.broker.statistics()
            queue = TOPOLOGY.agent_queue(AGENT)
            assert (stats.queues[queue].messages, stats.unacked[queue]) == (0, 0)
            assert {name: len(got) for name, got in replies.items()} == expected
            assert await h.call(AGENT, "echo", {"still": "serving"}) == {"still": "serving"}
        finally:
            await spy.aclose()
    return replies


@settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(requests=st.lists(raw_requests, min_size=1, max_size=4))
@example(
    requests=[
        Raw(b"\xff", None, None, 255, 0, -1, None, None, True, "past", {"x-attempt": True}),
        Raw(b"[1]", "text/plain", "echo", None, None, 2**63 - 1, "", "", True, 1.5, {}),
        Raw(b"{}", None, "boom", 9, None, None, None, None, True, "future", {"x-attempt": 2**70}),
    ]
)
def test_hostile_requests_are_settled_and_answered_once(requests: list[Raw]) -> None:
    """Any body and properties: every request acked, one reply per reply_to, worker serving."""
    asyncio.run(serve_hostile(requests))


async def test_an_overlong_action_name_is_answered_not_wedged() -> None:
    """A 300-character type (only memory:// carries one): INVALID_PAYLOAD, acked, served on."""
    replies = await serve_hostile(
        [Raw(b"{}", None, "a" * 300, None, None, None, None, "c-1", True, "absent", {})]
    )
    [[reply]] = replies.values()
    assert decode_reply(reply).code == "INVALID_PAYLOAD"


# -- late replies ---------------------------------------------------------------------------


class FakeAgent:
    """Takes requests off the agent's queue and never answers them in time."""

    def __init__(self) -> None:
        self.requests: list[Envelope] = []

    async def take(self, delivery: Delivery) -> None:
        self.requests.append(delivery.envelope)
        await delivery.ack()


async def timed_out_round(
    client: RpcClient, spy: InMemoryTransport, fake: FakeAgent, calls: int
) -> None:
    """``calls`` calls that time out, then a late reply to each, dropped by the client."""
    replies = await asyncio.gather(
        *(client.send(AGENT, "echo", {"i": i}, timeout_s=0.2) for i in range(calls))
    )
    assert {reply.code for reply in replies} == {"TIMEOUT"}
    del replies
    requests, fake.requests = fake.requests, []
    assert len(requests) == calls
    late_before = client.late_replies
    for request in requests:
        assert request.reply_to is not None
        reply = Envelope(
            body=b'{"ok": true, "data": "late"}',
            routing_key=request.reply_to,
            correlation_id=request.correlation_id,
        )
        await spy.publish(reply, timeout_s=1)
    del requests
    await wait_until(  # each reply is consumed in a task of its own
        lambda: client.late_replies >= late_before + calls,
        timeout_s=5,
        what="the late replies to arrive",
    )
    assert client.late_replies == late_before + calls
    assert client.pending_calls == 0


async def test_a_flood_of_late_replies_is_dropped_and_memory_stays_flat() -> None:
    """2000 timed-out calls, then 2000 late replies: dropped, nothing kept, memory flat."""
    calls = 2000
    broker = InMemoryBroker()
    fake = FakeAgent()
    async with InMemoryTransport(broker) as transport, InMemoryTransport(broker) as spy:
        queue = await spy.declare_queue(QueueSpec(name=TOPOLOGY.agent_queue(AGENT)))
        async with RpcClient(transport) as client:
            await spy.bind_queue(queue, TOPOLOGY.requests_exchange, AGENT)
            await spy.consume(queue, fake.take, prefetch=0)
            # Traced from the start: hash tables that are reallocated at the same size
            # must show on both sides. The first round warms caches and free lists.
            tracemalloc.start()
            try:
                await timed_out_round(client, spy, fake, calls)
                assert (client.late_replies, client.pending_calls) == (calls, 0)
                await timed_out_round(client, spy, fake, calls)
                gc.collect()
                before = tracemalloc.take_snapshot()
                await timed_out_round(client, spy, fake, calls)
                gc.collect()
                after = tracemalloc.take_snapshot()
            finally:
                tracemalloc.stop()
            assert client.late_replies == 3 * calls
            assert client.pending_calls == 0
    # The event loop's task registry (a WeakSet) keeps the capacity of its busiest
    # moment, which varies from run to run: it is asyncio's, not ours.
    ignore = [
        tracemalloc.Filter(False, "*/_weakrefset.py"),
        tracemalloc.Filter(False, "*/tracemalloc.py"),
    ]
    diff = after.filter_traces(ignore).compare_to(before.filter_traces(ignore), "lineno")
    size = sum(stat.size_diff for stat in diff)
    blocks = sum(stat.count_diff for stat in diff)
    top = [str(stat) for stat in diff[:5]]
    # A leak per late reply would add at least one block (and ~100 bytes) each.
    assert blocks < calls // 20, f"{blocks} more blocks after {calls} late replies: {top}"
    assert size < 64 * 1024, f"grew by {size} bytes over {calls} late replies: {top}"
