"""One call between its publish and its reply: the pending-call object of the RPC client.

A :class:`PendingCall` owns everything about a call in flight: its correlation id, its
deadline, the request to send again (idempotent calls only: others keep nothing but a
future, so a pending call stays small), and its result. Four parties may end it, each
through its own method, and the first one wins:

* the reply queue: :meth:`PendingCall.__call__` with the reply's envelope;
* the client's deadline heap: :meth:`PendingCall.time_out`;
* the client when the link or the reply queue is lost, or it closes: :meth:`lose`,
  :meth:`fail`;
* a publish that failed: :meth:`lose` (an idempotent call is then sent again).

The caller awaits :attr:`PendingCall.outcome` and :meth:`PendingCall.reply` turns it
into the answer: an :class:`~amqp_agents.models.messages.AgentResponse` always, or
:class:`SendAgain` for an idempotent call whose link died before its reply. (Two steps,
not one coroutine: a coroutine per call is measurable on the in-memory hot path.)
"""

from __future__ import annotations

import asyncio
from enum import Enum
from typing import TYPE_CHECKING, Final, TypeAlias

from amqp_agents.errors import ErrorCode
from amqp_agents.models.messages import AgentResponse
from amqp_agents.models.wire import decode_reply

if TYPE_CHECKING:
    from amqp_agents.models.envelope import Envelope

__all__ = ["PendingCall", "SendAgain", "failure"]


class SendAgain(Exception):  # a signal, not an error
    """The link died before the reply of an idempotent call: send it again."""


class _Marker(Enum):
    TIMED_OUT = "timed out"
    """Its deadline passed first."""
    SEND_AGAIN = "send again"
    """An idempotent call lost its link."""


CallOutcome: TypeAlias = "Envelope | AgentResponse | _Marker"
"""What ends a call: the reply, an error reply made here, or a marker."""
_TIMED_OUT: Final = _Marker.TIMED_OUT
_SEND_AGAIN: Final = _Marker.SEND_AGAIN


def failure(code: ErrorCode, message: str, correlation_id: str) -> AgentResponse:
    """A failed reply made on the caller's side (timeout, lost link, closing...)."""
    return AgentResponse.failure(code, message, correlation_id=correlation_id)


class PendingCall:
    """A call waiting for its reply. Ended once, by the first of its four writers."""

    __slots__ = ("_future", "correlation_id", "deadline", "refusals", "request")

    def __init__(
        self,
        correlation_id: str,
        deadline: float,
        request: Envelope | None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.correlation_id = correlation_id
        self.deadline = deadline
        """When it times out, on the running loop's clock."""
        self.request = request
        """The request to send again if the link dies: kept for idempotent calls only."""
        self.refusals = 0
        """Publishes of it that failed with the link (the resend backs off by them)."""
        self._future: asyncio.Future[CallOutcome]
        self._future = (loop or asyncio.get_running_loop()).create_future()

    @property
    def done(self) -> bool:
        """Ended (replied, timed out, failed or to be sent again)."""
        return self._future.done()

    def __call__(self, envelope: Envelope) -> None:
        """The reply arrived (the reply queue calls this; a duplicate is ignored)."""
        if not self._future.done():
            self._future.set_result(envelope)

    def time_out(self) -> None:
        """Its deadline passed before anything else ended it."""
        if not self._future.done():
            self._future.set_result(_TIMED_OUT)

    def fail(self, code: ErrorCode, message: str) -> None:
        """End it with an error reply made here (the client is closing, say)."""
        if not self._future.done():
            self._future.set_result(failure(code, message, self.correlation_id))

    def lose(self, message: str) -> None:
        """The link or the reply queue died before the reply: an idempotent call is sent
        again, any other ends with ``CONNECTION_LOST``."""
        if self.request is not None:
            if not self._future.done():
                self._future.set_result(_SEND_AGAIN)
        else:
            self.fail(ErrorCode.CONNECTION_LOST, message)

    def rearm(self) -> None:
        """Wait afresh, for the reply to the request sent again."""
        self._future = asyncio.get_running_loop().create_future()

    @property
    def outcome(self) -> asyncio.Future[CallOutcome]:
        """What ended the call, once it has ended (await it, then :meth:`reply`)."""
        return self._future

    def reply(
        self, outcome: CallOutcome, agent: str, action: str, timeout_s: float
    ) -> AgentResponse:
        """Say the ``outcome`` as a reply.

        Raises:
            SendAgain: an idempotent call lost its link: the caller sends it again
                (within its deadline), :meth:`rearm` s and awaits :attr:`outcome` again.
        """
        if outcome is _SEND_AGAIN:
            raise SendAgain
        if outcome is _TIMED_OUT:
            return failure(
                ErrorCode.TIMEOUT,
                f"no reply from {agent!r} to {action!r} within {timeout_s:g}s",
                self.correlation_id,
            )
        if isinstance(outcome, AgentResponse):
            return outcome
        return decode_reply(outcome)
