"""The RPC client: one ``await`` sends a request to a named agent and returns its reply.

How a call travels::

    send() --publish(mandatory, confirm)--> [agents exchange] --agent--> agents.<agent>
      |                                                                      |
      | future in _pending[correlation_id]                          worker handles it
      v                                                                      |
    reply consumer <--- exclusive reply queue <--- default exchange, key=reply_to

Guarantees:

* Many calls run concurrently on one client without a lock; each reply is matched to
  its call by correlation id, and a reply nobody waits for is dropped at once.
* Every call ends within its timeout (default 30 s) with a reply or an error reply:
  ``TIMEOUT``, ``NO_ROUTE`` (nobody serves the agent; known as soon as the broker
  returns the message), ``CONNECTION_LOST`` (every pending call, at once, when the
  connection dies) or ``SHUTTING_DOWN`` (pending calls when the client closes).
* When the reply queue ends (the connection is lost, the queue is deleted, its
  channel is closed) the calls waiting on it end at once with ``CONNECTION_LOST``,
  and :class:`~amqp_agents.transport.recovery.Recovery` declares and consumes a new
  one (after the transport reconnected, for a lost link). A call made meanwhile
  waits for it (within its publish timeout and its own deadline), then fails with
  ``CONNECTION_LOST``. A call marked ``idempotent=True`` is not failed by the loss:
  it is sent again once the queue is back, within its deadline (the agent may then
  see it twice: only mark calls that are safe to repeat).
* A request carries its deadline (header and AMQP ``expiration``), so the broker
  drops requests whose caller has stopped waiting.
* Called inside a handler (a :class:`~amqp_agents.models.context.MessageContext` is
  set), a call follows the request it serves: it ends by the handler's deadline at the
  latest (a larger ``timeout_s`` is cut to the time left, and the parent's
  ``x-deadline`` is sent unchanged), takes the handler's priority unless given one, and
  carries ``x-causation-id`` = the handler's message id. With no time left it is not
  published: ``send`` answers ``TIMEOUT`` at once, ``call`` and ``notify`` raise
  ``ActionTimeoutError``. It runs in the handler's task, so when the handler is
  cancelled (its time limit, a stopping worker) the call ends with it.

Caller bugs raise instead: a bad agent/action name or priority, a payload that is not
JSON-serialisable or too large, a client that is not started.

A call in flight is a :class:`~amqp_agents.rpc.pending.PendingCall` (its result, its
deadline, its re-send); one :class:`~amqp_agents.bounds.Deadlines` heap times them all.
The module is about 560 lines because the five ways to call (``send``, ``call``,
``notify``, ``send_many``, a handler's nested calls) share one request path and its
documented guarantees, above; the per-call state is already out, in ``pending.py``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Final, Self

from pydantic import BaseModel

from amqp_agents.bounds import Deadlines, gather_limited
from amqp_agents.config import RpcSettings
from amqp_agents.errors import (
    ActionTimeoutError,
    AgentError,
    BrokerUnavailableError,
    ConfigurationError,
    LifecycleError,
    NoRouteError,
    PublishRejectedError,
    PublishTimeoutError,
    QueueNotFoundError,
    UnroutableError,
)
from amqp_agents.metrics import Metrics, code_label
from amqp_agents.models.context import maybe_context
from amqp_agents.models.messages import AgentResponse, ErrorCode, IdSource, Priority
from amqp_agents.models.topology import MAX_PRIORITY, Topology, check_name
from amqp_agents.models.wire import dump_json, encode_request
from amqp_agents.rpc.pending import PendingCall, SendAgain, failure
from amqp_agents.transport.base import ConsumerEnd, EndReason, ExchangeKind, Transport
from amqp_agents.transport.recovery import Recovery
from amqp_agents.transport.replies import ReplyQueue

if TYPE_CHECKING:
    from types import TracebackType

    from amqp_agents.models.envelope import Envelope
    from amqp_agents.tracing import Tracing

__all__ = ["DEFAULT", "Request", "RpcClient"]

log = logging.getLogger(__name__)


class _Default(Enum):
    DEFAULT = "default"


DEFAULT: Final = _Default.DEFAULT
"""Sentinel: use the configured default (a timeout is never unbounded)."""

Payload = BaseModel | Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class Request:
    """One request of a batch for :meth:`RpcClient.send_many`."""

    agent: str
    action: str
    payload: Payload = None
    priority: int | _Default = DEFAULT
    """DEFAULT: the handler's priority inside a handler, else ``Priority.NORMAL``."""
    timeout_s: float | None = None
    idempotent: bool = False


class _State(Enum):
    NEW = "new"
    STARTED = "started"
    CLOSED = "closed"


_NAME_CACHE_SIZE: Final = 1024

_RESEND_BACKOFF_S: Final = 0.05
"""First pause before re-sending an idempotent call whose publish failed (doubling, at
most 1 s)."""


class RpcClient:
    """Calls agents over a :class:`~amqp_agents.transport.base.Transport`.

    The client does not own the transport: connect it first, close it after.
    Use as ``async with RpcClient(transport) as client: ...``.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        topology: Topology | None = None,
        settings: RpcSettings | None = None,
        publish_timeout_s: float = 10.0,
        max_message_bytes: int = 1024 * 1024,
        metrics: Metrics | None = None,
        recovery: Recovery | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._tracing = tracing
        self._transport = transport if tracing is None else tracing.wrap(transport)  # tracing
        self._metrics = metrics
        self._owns_recovery = recovery is None
        self._recovery = recovery or Recovery(transport, metrics=metrics)
        self._topology = topology or Topology()
        self._settings = settings or RpcSettings()
        self._default_timeout_s = self._timeout(self._settings.timeout_s)
        self._publish_timeout_s = publish_timeout_s
        self._max_bytes = max_message_bytes
        self._replies = ReplyQueue(self._recovery, on_lost=self._on_replies_lost)
        self._deadlines: Deadlines[PendingCall] = Deadlines(_expire, _finished)
        self._ids = IdSource()
        self._state = _State.NEW
        self._closed = asyncio.Event()
        self._valid_names: set[tuple[str, str]] = set()
        """(agent, action) pairs already checked: a regex per call is measurable."""
        self.resent = 0
        """Idempotent calls sent again after a lost connection."""

    @property
    def pending_calls(self) -> int:
        """Calls waiting for their reply right now."""
        return self._replies.waiting

    @property
    def late_replies(self) -> int:
        """Replies that arrived for no pending call (timed out, or unknown ids)."""
        return self._replies.unmatched

    @property
    def reply_queue(self) -> str:
        """The exclusive queue replies arrive on (the ``reply_to`` of requests)."""
        return self._replies.name

    async def start(self) -> None:
        """Declare the requests exchange and the reply queue, and start consuming replies."""
        if self._state is not _State.NEW:
            raise LifecycleError(f"RPC client is {self._state.value}; start() runs once")
        self._state = _State.STARTED
        await self._transport.declare_exchange(
            self._topology.requests_exchange, ExchangeKind.DIRECT
        )
        await self._replies.start()

    async def aclose(self) -> None:
        """Stop: pending calls end with ``SHUTTING_DOWN``. Idempotent; a cancelled
        ``aclose()`` is finished by calling it again."""
        if self._state is not _State.CLOSED:
            self._state = _State.CLOSED
            self._closed.set()  # calls waiting for the reply queue stop waiting
            self._fail_pending(ErrorCode.SHUTTING_DOWN, "the RPC client is closing")
            self._deadlines.clear()
        await self._replies.aclose()
        if self._owns_recovery:
            await self._recovery.aclose()  # leaves the transport's callbacks

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- calls -----------------------------------------------------------------------

    def send(
        self,
        agent: str,
        action: str,
        payload: Payload = None,
        *,
        priority: int | _Default = DEFAULT,
        timeout_s: float | _Default = DEFAULT,
        idempotent: bool = False,
    ) -> Coroutine[Any, Any, AgentResponse]:
        """Call ``agent.action(payload)``: await it for its reply, or an error reply.

        A plain function returning the call's coroutine (``await client.send(...)``,
        ``asyncio.create_task(client.send(...))``), not an ``async def``: that saves a
        coroutine frame per call in flight, about 300 bytes of a pending call's 1.6 KiB.
        Nothing runs, nothing is checked, until it is awaited.

        ``idempotent=True``: if the connection dies before the reply, send the request
        again once it is back (within the deadline) instead of failing the call.
        ``priority`` and ``timeout_s`` default to the configured ones, or inside a
        handler to its priority and time left (see the module docstring).

        Raises:
            LifecycleError: the client is not started, or closed.
            ConfigurationError: bad agent/action name, priority or timeout.
            InvalidPayloadError: the payload is not JSON-serialisable.
            MessageTooLargeError: the encoded payload is over the size limit.
        """
        if self._metrics is None and self._tracing is None:
            return self._send(agent, action, payload, priority, timeout_s, idempotent)
        # Made once the wrapper runs: a task cancelled before its first step leaves no
        # coroutine that was never awaited.
        start: Callable[[], Coroutine[Any, Any, AgentResponse]] = functools.partial(
            self._send, agent, action, payload, priority, timeout_s, idempotent
        )
        if self._metrics is not None:
            start = functools.partial(self._measured, agent, action, start)
        if self._tracing is None:
            return start()
        return self._tracing.call(agent, action, start)  # tracing: the call's span

    async def _measured(
        self, agent: str, action: str, start: Callable[[], Coroutine[Any, Any, AgentResponse]]
    ) -> AgentResponse:
        """The call ``start()`` makes, counted: pending calls, outcome, duration."""
        metrics = self._metrics
        assert metrics is not None  # noqa: S101  # only called with metrics
        started = time.perf_counter()
        metrics.rpc_pending.inc()
        try:
            response = await start()
        finally:
            metrics.rpc_pending.dec()
        outcome = "ok" if response.error is None else code_label(response.error.code)
        # Bounded labels: a name the other side does not know is not a new series.
        if outcome == ErrorCode.NO_ROUTE:
            agent, action = "other", "other"
        elif outcome == ErrorCode.UNKNOWN_ACTION:
            action = "other"
        metrics.child(metrics.rpc_calls, agent, action, outcome).inc()
        metrics.child(metrics.rpc_duration, agent, action).observe(time.perf_counter() - started)
        return response

    async def _send(
        self,
        agent: str,
        action: str,
        payload: Payload,
        priority: int | _Default,
        timeout_s: float | _Default,
        idempotent: bool,
    ) -> AgentResponse:
        # The first try. Its frame is what a call waiting for its reply keeps, so it
        # holds few locals; a call sent again continues in _send_again.
        correlation_id = self._ids.next()
        try:
            envelope, timeout = self._request(
                agent, action, payload, priority, timeout_s, correlation_id, self._replies.name
            )
        except ActionTimeoutError as exc:
            return failure(ErrorCode.TIMEOUT, exc.message, correlation_id)
        loop = asyncio.get_running_loop()
        call = PendingCall(
            correlation_id, loop.time() + timeout, envelope if idempotent else None, loop
        )
        self._deadlines.arm(call.deadline, call, loop)
        try:
            if not self._replies.live.is_set():
                lost = await self._await_restored(call.deadline, correlation_id)
                if lost is not None:
                    return lost
                envelope.reply_to = self._replies.name
            failed = await self._publish(call, envelope, agent)
            if failed is not None:
                return failed
            # Waiting, a call keeps no request unless it is to be sent again: the
            # envelope and its body are most of a pending call's memory.
            del envelope
            try:
                return call.reply(await call.outcome, agent, action, timeout)
            except SendAgain:
                return await self._send_again(call, agent, action, timeout)
        finally:
            # Also on cancellation: a late reply then finds nothing and is dropped.
            self._replies.forget(correlation_id)
            self._deadlines.release()

    async def _publish(
        self, call: PendingCall, envelope: Envelope, agent: str
    ) -> AgentResponse | None:
        """Publish the request of ``call``: an error reply if the broker refused it."""
        self._replies.expect(call.correlation_id, call)
        loop = self._deadlines.loop  # the running loop: the call's deadline is armed
        assert loop is not None  # noqa: S101
        try:
            await self._transport.publish(
                envelope,
                mandatory=True,
                timeout_s=min(self._publish_timeout_s, call.deadline - loop.time()),
            )
        except (UnroutableError, QueueNotFoundError):
            return failure(
                ErrorCode.NO_ROUTE, f"no agent {agent!r} is being served", call.correlation_id
            )
        except PublishTimeoutError as exc:
            return failure(ErrorCode.TIMEOUT, str(exc), call.correlation_id)
        except PublishRejectedError as exc:
            return failure(ErrorCode.REJECTED, str(exc), call.correlation_id)
        except BrokerUnavailableError as exc:
            call.lose(str(exc))
            call.refusals += call.request is not None
        return None

    async def _send_again(
        self, call: PendingCall, agent: str, action: str, within_s: float
    ) -> AgentResponse:
        """An idempotent call lost its link before the reply: send it again once the
        reply queue is back, within its deadline."""
        loop = asyncio.get_running_loop()
        envelope = call.request
        assert envelope is not None  # noqa: S101  # only an idempotent call is sent again
        while True:
            # If the publish itself failed, back off first: a link that fails every
            # publish must not make this a hot loop (bounded by the deadline).
            if call.refusals:
                pause = min(_RESEND_BACKOFF_S * 2 ** min(call.refusals - 1, 10), 1.0)
                await asyncio.sleep(min(pause, max(call.deadline - loop.time(), 0)))
            if loop.time() >= call.deadline:  # out of time: it times out, not sent again
                call.rearm()
                call.time_out()
                return call.reply(await call.outcome, agent, action, within_s)
            lost = await self._await_restored(call.deadline, call.correlation_id)
            if lost is not None:
                return lost
            envelope.reply_to = self._replies.name
            envelope.expiration_ms = max(1, int((call.deadline - loop.time()) * 1000))
            call.rearm()
            self.resent += 1
            failed = await self._publish(call, envelope, agent)
            if failed is not None:
                return failed
            try:
                return call.reply(await call.outcome, agent, action, within_s)
            except SendAgain:
                pass

    async def _await_restored(self, deadline: float, correlation_id: str) -> AgentResponse | None:
        """Wait for the reply queue to be back after a lost connection, within the
        publish timeout and the call's deadline; ``None`` when it is back."""
        loop = asyncio.get_running_loop()
        bound = min(self._publish_timeout_s, deadline - loop.time())
        if bound > 0 and not self._closed.is_set():
            live = asyncio.ensure_future(self._replies.live.wait())
            closed = asyncio.ensure_future(self._closed.wait())
            try:
                await asyncio.wait(
                    {live, closed}, timeout=bound, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                live.cancel()
                closed.cancel()
        if self._state is not _State.STARTED:
            return failure(ErrorCode.SHUTTING_DOWN, "the RPC client is closing", correlation_id)
        if self._replies.live.is_set():
            return None
        return failure(
            ErrorCode.CONNECTION_LOST,
            f"the broker connection is lost and was not restored within {max(bound, 0):g}s",
            correlation_id,
        )

    async def call(
        self,
        agent: str,
        action: str,
        payload: Payload = None,
        *,
        priority: int | _Default = DEFAULT,
        timeout_s: float | _Default = DEFAULT,
        idempotent: bool = False,
    ) -> Any:
        """Like :meth:`send`, but return the reply's data or raise its error.

        Raises:
            AgentError: the matching subclass for the reply's error code
                (``NotFoundError``, ``ActionTimeoutError``, ``NoRouteError``...), and
                as :meth:`send`.
        """
        response = await self.send(
            agent, action, payload, priority=priority, timeout_s=timeout_s, idempotent=idempotent
        )
        if response.error is not None:
            raise AgentError.from_info(response.error)
        return response.data

    async def notify(
        self,
        agent: str,
        action: str,
        payload: Payload = None,
        *,
        priority: int | _Default = DEFAULT,
        timeout_s: float | _Default = DEFAULT,
    ) -> None:
        """Fire-and-forget: enqueue a request with no ``reply_to``.

        Returns once the broker has confirmed it. ``timeout_s`` becomes the request's
        TTL: the broker drops it if no worker took it by then.

        Raises:
            ActionTimeoutError: called in a handler whose deadline has passed (nothing
                is published).
            NoRouteError: nobody serves the agent.
            TransportError: the publish was not confirmed (timeout, refusal, link loss).
        """
        envelope, _timeout = self._request(agent, action, payload, priority, timeout_s, None, None)
        try:
            await self._transport.publish(
                envelope, mandatory=True, timeout_s=self._publish_timeout_s
            )
        except (UnroutableError, QueueNotFoundError):
            raise NoRouteError(f"no agent {agent!r} is being served") from None

    async def send_many(
        self, requests: Sequence[Request], *, concurrency: int | None = None
    ) -> list[AgentResponse]:
        """Send a batch concurrently, at most ``concurrency`` at a time; replies in order.

        Inside a handler every request follows it, as :meth:`send` does.
        """
        if concurrency is not None and concurrency < 1:
            raise ConfigurationError("concurrency must be at least 1")
        calls = [
            functools.partial(
                self.send,
                request.agent,
                request.action,
                request.payload,
                priority=request.priority,
                timeout_s=DEFAULT if request.timeout_s is None else request.timeout_s,
                idempotent=request.idempotent,
            )
            for request in requests
        ]
        return await gather_limited(calls, limit=concurrency or max(1, len(requests)))

    # -- internals -------------------------------------------------------------------

    def _timeout(self, timeout_s: float | _Default) -> float:
        if timeout_s is DEFAULT:
            return self._default_timeout_s
        timeout = timeout_s
        if not isinstance(timeout, int | float) or not timeout > 0:
            raise ConfigurationError(f"timeout_s must be a positive number, not {timeout_s!r}")
        # inf and anything past a day would make an expiration the broker refuses.
        if not timeout <= RpcSettings.max_timeout_s:
            raise ConfigurationError(
                f"timeout_s must be at most {RpcSettings.max_timeout_s:g} s (one day),"
                f" not {timeout_s!r}"
            )
        return float(timeout)

    def _request(
        self,
        agent: str,
        action: str,
        payload: Payload,
        priority: int | _Default,
        timeout_s: float | _Default,
        correlation_id: str | None,
        reply_to: str | None,
    ) -> tuple[Envelope, float]:
        """The request to publish and its timeout (see :func:`_follow`).

        Raises:
            ActionTimeoutError: the deadline of the handler making the call has passed.
        """
        if self._state is not _State.STARTED:
            raise LifecycleError(f"RPC client is {self._state.value}; call start() first")
        priority, timeout, deadline_ms, causation_id = _follow(
            priority, self._timeout(timeout_s), agent
        )
        if (agent, action) not in self._valid_names:
            try:
                check_name("agent", agent)
                check_name("action", action)
            except ValueError as exc:
                raise ConfigurationError(str(exc)) from None
            if len(self._valid_names) >= _NAME_CACHE_SIZE:
                self._valid_names.clear()
            self._valid_names.add((agent, action))
        if not 0 <= priority <= MAX_PRIORITY:
            raise ConfigurationError(f"priority must be 0-{MAX_PRIORITY}, not {priority}")
        body = b"{}" if payload is None else dump_json(payload)
        return encode_request(
            self._topology,
            agent,
            action,
            body,
            message_id=correlation_id or self._ids.next(),
            correlation_id=correlation_id,
            reply_to=reply_to,
            priority=int(priority),
            timeout_s=timeout,
            max_bytes=self._max_bytes,
            deadline_ms=deadline_ms,
            causation_id=causation_id,
            persistent=self._settings.persistent,
        ), timeout

    def _on_replies_lost(self, end: ConsumerEnd) -> None:
        # Replies sent to the old queue are gone: nobody may wait for them.
        if end.reason is EndReason.CONNECTION_LOST:
            message = "the broker connection was lost"
        else:
            message = f"the reply queue was lost ({end.reason.value}: {end.text})"
        self._fail_pending(ErrorCode.CONNECTION_LOST, message)

    def _fail_pending(self, code: ErrorCode, message: str) -> None:
        for waiter in self._replies.drain().values():
            if isinstance(waiter, PendingCall):
                if code is ErrorCode.CONNECTION_LOST:
                    waiter.lose(message)
                else:
                    waiter.fail(code, message)


def _follow(
    priority: int | _Default, timeout: float, agent: str
) -> tuple[int, float, int | None, str | None]:
    """A call's priority, timeout, ``x-deadline`` (``None``: from the timeout) and
    causation id: the running handler's, where it has one and the caller gave none.

    The timeout never outlasts the handler's deadline; when that deadline is the bound,
    it is sent unchanged, so every hop of a request agrees on it to the millisecond.

    Raises:
        ActionTimeoutError: the handler's deadline has passed (nothing to send).
    """
    context = maybe_context()
    if context is None:
        return (Priority.NORMAL if priority is DEFAULT else priority), timeout, None, None
    if priority is DEFAULT:
        priority = Priority.NORMAL if context.priority is None else context.priority
    deadline_ms = None
    left = context.time_left_s()
    if left is not None and context.deadline is not None and left < timeout:
        if left <= 0:
            raise ActionTimeoutError(
                f"not sent to {agent!r}: the deadline of the request being handled has passed"
            )
        timeout, deadline_ms = left, round(context.deadline * 1000)
    return priority, timeout, deadline_ms, context.message_id or None


def _expire(call: PendingCall, _now: float) -> None:
    call.time_out()


def _finished(call: PendingCall) -> bool:
    return call.done
