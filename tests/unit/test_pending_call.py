"""A pending call ends once, by the first of its writers, and says it as a reply."""

from __future__ import annotations

import asyncio

import pytest

from amqp_agents.errors import ErrorCode
from amqp_agents.models.envelope import Envelope
from amqp_agents.rpc.pending import PendingCall, SendAgain

REPLY = Envelope(body=b'{"ok": true, "data": 7}', exchange="", routing_key="q", correlation_id="c")


def _call(*, idempotent: bool = False) -> PendingCall:
    request = Envelope(body=b"{}", exchange="agents", routing_key="a") if idempotent else None
    return PendingCall("c", asyncio.get_running_loop().time() + 1, request)


async def test_the_reply_wins_over_a_later_timeout() -> None:
    """The reply arrives, then the deadline passes: the reply is decoded."""
    call = _call()
    call(REPLY)
    call.time_out()
    reply = call.reply(await call.outcome, "a", "b", 1)
    assert (reply.ok, reply.data, reply.correlation_id) == (True, 7, "c")


async def test_a_timeout_wins_over_a_late_reply() -> None:
    """The deadline passes first: TIMEOUT naming the agent, action and time."""
    call = _call()
    call.time_out()
    call(REPLY)
    reply = call.reply(await call.outcome, "tasks", "add", 2.5)
    assert reply.code == ErrorCode.TIMEOUT
    assert reply.error is not None
    assert reply.error.message == "no reply from 'tasks' to 'add' within 2.5s"


async def test_a_lost_link_fails_a_plain_call_and_resends_an_idempotent_one() -> None:
    """lose(): CONNECTION_LOST for a plain call; SendAgain for an idempotent one, which
    can then wait again (rearm) for the reply to the request sent again."""
    plain = _call()
    plain.lose("gone")
    reply = plain.reply(await plain.outcome, "a", "b", 1)
    assert (reply.code, reply.correlation_id) == (ErrorCode.CONNECTION_LOST, "c")

    idempotent = _call(idempotent=True)
    idempotent.lose("gone")
    with pytest.raises(SendAgain):
        idempotent.reply(await idempotent.outcome, "a", "b", 1)
    idempotent.rearm()
    assert not idempotent.done
    idempotent(REPLY)
    assert (idempotent.reply(await idempotent.outcome, "a", "b", 1)).data == 7


async def test_fail_ends_it_with_the_given_code() -> None:
    """The client closing: SHUTTING_DOWN with the message, even for an idempotent call."""
    call = _call(idempotent=True)
    call.fail(ErrorCode.SHUTTING_DOWN, "closing")
    reply = call.reply(await call.outcome, "a", "b", 1)
    assert reply.code == ErrorCode.SHUTTING_DOWN
    assert call.done
