"""Agents: named services whose actions answer requests.

An action is a plain ``async`` method marked with :func:`action`; the decorator only
attaches metadata, so a unit test calls the method directly with a payload model::

    class Tasks(Agent):
        name = "task_manager"

        @action("task_add")
        async def add(self, payload: TaskAdd) -> Task: ...

    await Tasks().add(TaskAdd(title="x"))          # a plain call in a unit test
    await Tasks().handle(message)                   # the full request path

A handler that needs more than its payload asks :attr:`Agent.context` (the message id
to deduplicate on, the attempt, the deadline...); an agent with ``calls_agents = True``
calls other agents through :attr:`Agent.rpc`, and those calls follow the request it
handles (its deadline, priority and causation id: see
:mod:`~amqp_agents.models.context`).

:meth:`Agent.handle` turns a request into a reply and owns the error mapping: schema
failures become ``INVALID_PAYLOAD`` with the field errors, an unknown action
``UNKNOWN_ACTION``, an :class:`~amqp_agents.errors.AgentError` its own code, and any
other exception ``INTERNAL_ERROR`` (traceback to the log, never to the wire).

It is about 600 lines because the decorators, the handler checks done at definition
time, the declared contract (``emits``, ``$describe``) and the tries of one request all
describe what an action is; the tries (time limits, in-process retries) are the seam to
split along next.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from amqp_agents.bounds import TimeLimits
from amqp_agents.config import NO_RETRY, RetryPolicy
from amqp_agents.errors import (
    ActionTimeoutError,
    AgentError,
    ConfigurationError,
    InvalidPayloadError,
    LifecycleError,
    Retry,
    UnknownActionError,
)
from amqp_agents.events.publisher import EventPublisher, RecordingPublisher
from amqp_agents.models.context import MessageContext, current_context, use_context
from amqp_agents.models.messages import AgentMessage, AgentResponse, ErrorCode
from amqp_agents.models.schema import (
    adapter_for,
    check_accepts_object,
    handler_argument,
    validate_payload,
)
from amqp_agents.models.topic import validate_pattern
from amqp_agents.models.topology import ACTION_DESCRIBE, RESERVED_ACTIONS, check_name
from amqp_agents.runtime.describe import check_emits, contract_of

if TYPE_CHECKING:
    from pydantic import BaseModel, TypeAdapter

    from amqp_agents.models.wire import RequestParts
    from amqp_agents.rpc.client import RpcClient

__all__ = ["ActionSpec", "Agent", "EventHandlerSpec", "Outcome", "action", "on_event"]

log = logging.getLogger(__name__)

_ACTION_ATTR = "__amqp_agents_action__"
_EVENT_ATTR = "__amqp_agents_events__"
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class Outcome:
    """What running a request gave: the reply, and whether a redelivery may help.

    A success keeps the handler's result as :attr:`data` and builds its
    :attr:`response` model only when asked: the worker encodes the reply straight
    from the data, and most requests succeed.
    """

    __slots__ = ("_correlation_id", "_response", "data", "delay_s", "retryable")

    def __init__(
        self,
        response: AgentResponse | None = None,
        *,
        data: Any = None,
        correlation_id: str | None = None,
        retryable: bool = False,
        delay_s: float | None = None,
    ) -> None:
        self._response = response
        self._correlation_id = correlation_id if response is None else response.correlation_id
        self.data: Any = data if response is None else response.data
        """The successful reply's data (``None`` for a failure)."""
        self.retryable = retryable
        """A redelivery may help (a retryable failure)."""
        self.delay_s = delay_s
        """The delay a ``Retry(delay_s=...)`` asked for."""

    @classmethod
    def success(cls, data: Any, *, correlation_id: str | None = None) -> Outcome:
        """A successful outcome carrying the handler's result."""
        return cls(data=data, correlation_id=correlation_id)

    @property
    def ok(self) -> bool:
        """The request succeeded."""
        return self._response is None or self._response.ok

    @property
    def response(self) -> AgentResponse:
        """The reply as a model."""
        if self._response is None:
            self._response = AgentResponse.success(self.data, correlation_id=self._correlation_id)
        return self._response

    def __repr__(self) -> str:
        return f"Outcome(response={self.response!r}, retryable={self.retryable!r})"


@dataclass(frozen=True, slots=True)
class ActionSpec:
    """What :func:`action` records on a handler."""

    name: str
    timeout_s: float | None
    method: str
    payload: TypeAdapter[Any] | None
    """Validates the request's JSON object into the handler's argument; None: no argument."""
    retry: RetryPolicy | None = None
    """This action's retry policy; None: the worker's."""


def action(
    name: str, *, timeout_s: float | None = None, retry: RetryPolicy | None = None
) -> Callable[[F], F]:
    """Mark an ``async`` method as the handler of action ``name``.

    The handler takes at most one argument besides ``self``: the payload, annotated
    with a pydantic model (or ``dict[str, Any]`` for raw JSON). ``timeout_s`` overrides
    the worker's default per-action timeout, ``retry`` its retry policy.

    Raises:
        ConfigurationError: at class definition, for a bad name or timeout, a handler
            that is not ``async def``, or ``@action`` used without its parentheses.
    """
    _check_decorator_argument("action", name)
    if name in RESERVED_ACTIONS:
        raise ConfigurationError(
            f"action name {name!r} is reserved: every agent answers it (docs/protocol.md)"
        )
    check_name("action", name)
    if timeout_s is not None and not timeout_s > 0:
        raise ConfigurationError(f"action {name!r}: timeout_s must be positive")

    def mark(func: F) -> F:
        check: Callable[..., Any] = func  # keep ``func`` un-narrowed for the return type
        if not inspect.iscoroutinefunction(check):
            raise ConfigurationError(f"action {name!r}: {func.__qualname__} must be async def")
        setattr(func, _ACTION_ATTR, (name, timeout_s, retry))
        return func

    return mark


@dataclass(frozen=True, slots=True)
class EventHandlerSpec:
    """What :func:`on_event` records on a handler."""

    pattern: str
    group: str | None
    """``None``: the agent's name (resolved by :meth:`Agent.event_handlers`)."""
    broadcast: bool
    method: str


def on_event(
    pattern: str, *, group: str | None = None, broadcast: bool = False
) -> Callable[[F], F]:
    """Mark an ``async`` method as a handler of events matching ``pattern``.

    By default the handlers of an agent form the group named after the agent: each
    event is handled once by one replica of the agent. ``group="audit"`` joins another
    group; ``broadcast=True`` gives every process its own private queue instead.
    The argument works as in :meth:`amqp_agents.events.bus.EventBus.subscribe`.
    Decorators stack: one method may handle several patterns.
    """
    _check_decorator_argument("on_event", pattern)
    validate_pattern(pattern)
    if group is not None:
        check_name("group", group)
    if broadcast and group is not None:
        raise ConfigurationError("on_event: a broadcast handler has no group")

    def mark(func: F) -> F:
        check: Callable[..., Any] = func
        if not inspect.iscoroutinefunction(check):
            raise ConfigurationError(f"on_event {pattern!r}: {func.__qualname__} must be async def")
        marks: list[tuple[str, str | None, bool]] = list(getattr(func, _EVENT_ATTR, ()))
        marks.append((pattern, group, broadcast))
        setattr(func, _EVENT_ATTR, tuple(marks))
        return func

    return mark


def _check_decorator_argument(decorator: str, value: object) -> None:
    """Fail clearly on ``@action`` (or ``@on_event``) written without its argument list:
    Python then passes the method itself where the name belongs."""
    if isinstance(value, str):
        return
    what = "an action name" if decorator == "action" else "a topic pattern"
    if callable(value):
        where = getattr(value, "__qualname__", repr(value))
        raise ConfigurationError(
            f'@{decorator} needs {what}: write @{decorator}("...") above {where},'
            f" not a bare @{decorator}"
        )
    raise ConfigurationError(f"@{decorator} needs {what} (a string), not {value!r}")


def _payload_adapter(func: Callable[..., Any], action_name: str) -> TypeAdapter[Any] | None:
    what = f"action {action_name!r}"
    annotation = handler_argument(func, bound=True, what=what)
    if annotation is None:
        return None
    adapter = adapter_for(annotation)
    check_accepts_object(adapter, what=f"{what} ({func.__qualname__})")
    return adapter


class Agent:
    """Base class of agents. Subclasses set ``name`` (or pass ``name=``) and declare actions.

    ``start()``/``shutdown()`` are hooks for resources (open a database, close it);
    the worker calls them around consuming. ``handle`` works whether or not the agent
    is running, so unit tests need no lifecycle.
    """

    name: str = ""
    """The agent's name: its routing key and queue ``agents.<name>``."""
    start_timeout_s: ClassVar[float] = 60.0
    """How long :meth:`start` may take in a worker (override for slow resources): past
    it the worker does not start (a hung dependency fails fast, not silently)."""
    events: EventPublisher
    """Where :meth:`emit` publishes: the worker's event bus, or a recorder in tests."""
    emits: ClassVar[Mapping[str, Any]] = {}
    """The events this agent publishes, for its contract (``$describe``, AsyncAPI):
    event type -> payload type, e.g. ``{"task.created": TaskEvent}``. Checked when the
    class is defined; :meth:`emit` does not enforce it."""
    calls_agents: ClassVar[bool] = False
    """Set it to have the worker give this agent :attr:`rpc` (one reply queue per
    worker, made only when a hosted agent asks for it)."""
    _actions: ClassVar[dict[str, ActionSpec]] = {}
    _action_names: ClassVar[frozenset[str]] = frozenset()
    _event_specs: ClassVar[tuple[EventHandlerSpec, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        actions: dict[str, ActionSpec] = {}
        events: dict[tuple[str, str | None, bool, str], EventHandlerSpec] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                for pattern, group, broadcast in getattr(value, _EVENT_ATTR, ()):
                    events[(pattern, group, broadcast, attr)] = EventHandlerSpec(
                        pattern=pattern, group=group, broadcast=broadcast, method=attr
                    )
                marked = getattr(value, _ACTION_ATTR, None)
                if marked is None:
                    continue
                action_name, timeout_s, retry = marked
                existing = actions.get(action_name)
                if existing is not None and existing.method != attr and klass is cls:
                    raise ConfigurationError(
                        f"{cls.__qualname__}: action {action_name!r} is declared by both"
                        f" {existing.method} and {attr}"
                    )
                actions[action_name] = ActionSpec(
                    name=action_name,
                    timeout_s=timeout_s,
                    method=attr,
                    payload=_payload_adapter(value, action_name),
                    retry=retry,
                )
        check_emits(cls.emits, where=cls.__qualname__)
        cls._actions = actions
        cls._action_names = frozenset(actions)
        cls._event_specs = tuple(events.values())

    def __init__(self, *, name: str | None = None) -> None:
        """Name the agent (``name`` overrides the class attribute).

        Raises:
            ConfigurationError: no name, an invalid one, or a class that declares
                neither an action nor an event handler.
        """
        if name is not None:
            self.name = name  # e.g. one class served under several names
        if not self.name:
            raise ConfigurationError(f"{type(self).__qualname__} must set a class attribute 'name'")
        check_name("agent", self.name)
        if not self._actions and not self._event_specs:
            # Such an agent would consume its queue and answer every request
            # UNKNOWN_ACTION: a forgotten decorator, not a design.
            raise ConfigurationError(
                f"{type(self).__qualname__} (agent {self.name!r}) has no actions and no event"
                ' handlers: mark its async methods with @action("name") or @on_event("pattern")'
            )
        self._running = False
        self._limits = TimeLimits()
        self.events = RecordingPublisher()
        self._rpc: RpcClient | None = None

    @property
    def context(self) -> MessageContext:
        """The context of the message being handled (see
        :func:`~amqp_agents.models.context.current_context`).

        Raises:
            LifecycleError: read outside a handler.
        """
        return current_context()

    @property
    def rpc(self) -> RpcClient:
        """The client this agent calls other agents with, inside its handlers.

        Raises:
            LifecycleError: none was given: set ``calls_agents = True`` on the class so
                that its worker gives one, or assign one (a test).
        """
        if self._rpc is None:
            raise LifecycleError(
                f"agent {self.name!r} has no RPC client: set calls_agents = True on"
                f" {type(self).__qualname__} so that its worker gives it one, or assign"
                " agent.rpc"
            )
        return self._rpc

    @rpc.setter
    def rpc(self, client: RpcClient) -> None:
        self._rpc = client

    @property
    def is_running(self) -> bool:
        """True between :meth:`start` and :meth:`shutdown`."""
        return self._running

    @property
    def action_names(self) -> frozenset[str]:
        """The names of the actions this agent serves (cheap; for label checks)."""
        return self._action_names

    def retry_policy(self, action: str | None, default: RetryPolicy) -> RetryPolicy:
        """The retry policy of ``action``: its own (``@action(retry=...)``), else ``default``."""
        spec = self._actions.get(action or "")
        return spec.retry if spec is not None and spec.retry is not None else default

    @classmethod
    def actions(cls) -> dict[str, ActionSpec]:
        """The actions this agent serves, by name."""
        return dict(cls._actions)

    def event_handlers(self) -> list[tuple[EventHandlerSpec, Callable[..., Awaitable[Any]]]]:
        """This agent's event handlers with their group resolved, bound to ``self``."""
        resolved = []
        for spec in self._event_specs:
            group = None if spec.broadcast else (spec.group or self.name)
            resolved.append(
                (
                    EventHandlerSpec(spec.pattern, group, spec.broadcast, spec.method),
                    getattr(self, spec.method),
                )
            )
        return resolved

    async def emit(self, event_type: str, payload: BaseModel | dict[str, Any] | None = None) -> str:
        """Publish an event through :attr:`events`; returns its id once confirmed."""
        return await self.events.publish(event_type, payload)

    async def start(self) -> None:
        """Acquire resources. Override and call ``super().start()`` last."""
        if self._running:
            raise LifecycleError(f"agent {self.name!r} is already running")
        self._running = True

    async def shutdown(self) -> None:
        """Release resources. Override and call ``super().shutdown()``. Idempotent."""
        self._running = False

    async def handle(
        self, message: AgentMessage, *, timeout_s: float | None = None
    ) -> AgentResponse:
        """Run the request's action and return the reply; never raises but cancellation.

        ``timeout_s`` bounds the handler (the action's own ``timeout_s`` wins when
        smaller); a handler that overruns is cancelled and answered ``TIMEOUT``. The
        action's retry policy applies in process; redeliveries are the worker's. The
        handler's :attr:`context` is the message's (attempt 1).
        """
        context = MessageContext(
            message_id=message.id,
            correlation_id=message.correlation_id,
            deadline=None if message.deadline is None else message.deadline.timestamp(),
            priority=message.priority,
            redelivered=message.redelivered,
            agent=self.name,
            action=message.action,
        )
        policy = self.retry_policy(message.action, NO_RETRY)
        with use_context(context):
            outcome = await self.run(message, timeout_s=timeout_s, policy=policy)
        return outcome.response

    async def run(
        self,
        message: AgentMessage | RequestParts,
        *,
        timeout_s: float | None = None,
        policy: RetryPolicy = NO_RETRY,
        deadline: float | None = None,
    ) -> Outcome:
        """Run the request with in-process retries; the reply and whether to redeliver.

        ``policy`` is the action's, resolved once by the caller with
        :meth:`retry_policy` (the worker uses it again to decide on a redelivery);
        ``deadline`` (``time.monotonic``) bounds every try and every backoff: no retry
        starts that could not finish.
        """
        cid = message.correlation_id
        spec = self._actions.get(message.action)
        if spec is None:
            if message.action == ACTION_DESCRIBE:  # reserved: never a declared action
                return Outcome.success(contract_of(self).describe(), correlation_id=cid)
            known = ", ".join(sorted(self._actions)) or "none"
            unknown = UnknownActionError(
                f"agent {self.name!r} has no action {message.action!r} (known: {known})"
            )
            return Outcome(AgentResponse.from_error(unknown, correlation_id=cid))
        adapter = spec.payload
        try:
            payload = None if adapter is None else validate_payload(adapter, message.payload)
        except InvalidPayloadError as exc:
            return Outcome(AgentResponse.from_error(exc, correlation_id=cid))
        limit = _smallest(spec.timeout_s, timeout_s)
        method = getattr(self, spec.method)
        takes_payload = adapter is not None
        try:
            try:
                # The first try runs bare: tenacity's machinery costs more than a
                # typical handler, and most requests succeed the first time.
                result = await self._try(method, takes_payload, payload, limit, deadline)
            except Exception as first:
                if policy.attempts < 2 or not _in_process(policy, first):
                    raise
                log.info("retrying %s.%s (correlation id %s)", self.name, message.action, cid)

                async def call_once() -> Any:  # async def: tenacity awaits coroutine functions
                    return await self._try(method, takes_payload, payload, limit, deadline)

                try:
                    result = await _retry(policy, deadline, call_once)
                except _NoTimeToRetry:
                    raise first from None
        except _TimedOut as exc:
            timed_out = ActionTimeoutError(
                f"action {message.action!r} took longer than {exc.limit_s:g}s"
            )
            response = AgentResponse.from_error(timed_out, correlation_id=cid)
            return Outcome(response, retryable=policy.is_retryable(exc, timed_out=True))
        except AgentError as exc:
            return Outcome(
                AgentResponse.from_error(exc, correlation_id=cid),
                retryable=policy.is_retryable(exc),
                delay_s=exc.delay_s if isinstance(exc, Retry) else None,
            )
        except Exception as exc:
            return Outcome(self._internal_error(message), retryable=policy.is_retryable(exc))
        return Outcome.success(result, correlation_id=cid)

    def stuck_tries(self, grace_s: float) -> list[asyncio.Task[object]]:
        """Tasks of tries cut off by their time limit more than ``grace_s`` ago that
        still run (the handler ignores cancellation): the worker abandons them."""
        return [limit.task for limit in self._limits.overdue(grace_s)]

    async def _try(
        self,
        method: Callable[..., Awaitable[Any]],
        takes_payload: bool,
        payload: Any,
        limit: float | None,
        deadline: float | None,
    ) -> Any:
        """One try, bounded by ``limit`` and the deadline; overrun raises ``_TimedOut``."""
        if deadline is not None:
            limit = _smallest(limit, max(deadline - time.monotonic(), 0.0))
        if limit is None:
            return await (method(payload) if takes_payload else method())
        guard = self._limits.arm(limit)
        try:
            result = await (method(payload) if takes_payload else method())
        except BaseException as exc:
            if guard.end(exc):
                raise _TimedOut(limit) from exc
            raise
        guard.end(None)
        return result

    def _internal_error(self, message: AgentMessage | RequestParts) -> AgentResponse:
        log.exception(
            "action %s.%s failed (correlation id %s)",
            self.name,
            message.action,
            message.correlation_id,
        )
        return AgentResponse.failure(
            ErrorCode.INTERNAL_ERROR,
            f"action {message.action!r} failed; the agent's log has the details"
            f" (correlation id {message.correlation_id})",
            correlation_id=message.correlation_id,
        )


def _in_process(policy: RetryPolicy, error: BaseException) -> bool:
    """Whether ``error`` is retried within the delivery under ``policy``."""
    timed_out = isinstance(error, _TimedOut)
    return policy.is_retryable(error, timed_out=timed_out) and policy.retries_in_process(error)


async def _retry(
    policy: RetryPolicy, deadline: float | None, call_once: Callable[[], Awaitable[Any]]
) -> Any:
    """The tries after a failed first one: tenacity, backoff with full jitter, bounded by
    the policy's attempts and the deadline; the last failure is raised."""
    retrying = AsyncRetrying(
        stop=stop_after_attempt(policy.attempts - 1) | _StopAtDeadline(deadline),
        # "Full jitter": a random wait up to initial * 2**n, capped.
        wait=wait_random_exponential(multiplier=policy.backoff_initial_s, max=policy.backoff_max_s),
        retry=retry_if_exception(lambda error: _in_process(policy, error)),
        reraise=True,
    )
    pause = retrying.wait(_first_try_state(retrying))
    if deadline is not None and time.monotonic() + pause >= deadline:
        raise _NoTimeToRetry
    await asyncio.sleep(pause)
    return await retrying(call_once)


class _NoTimeToRetry(Exception):
    """The backoff before the next try would end past the deadline."""


class _TimedOut(Exception):
    """A try ran out of its time limit (told apart from a TimeoutError the handler raised)."""

    def __init__(self, limit_s: float) -> None:
        super().__init__(f"timed out after {limit_s:g}s")
        self.limit_s = limit_s


class _StopAtDeadline(stop_base):
    """Stop retrying when the next backoff would end past the deadline."""

    def __init__(self, deadline: float | None) -> None:
        self._deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        if self._deadline is None:
            return False
        return time.monotonic() + retry_state.upcoming_sleep >= self._deadline


def _first_try_state(retrying: AsyncRetrying) -> RetryCallState:
    """A retry state for the wait after the bare first try (attempt 1)."""
    return RetryCallState(retrying, fn=None, args=(), kwargs={})


def _smallest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
