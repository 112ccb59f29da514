"""Bounds for handlers: how many run at once, and how long each try may take.

A leaf (it imports nothing of the package): the worker's slots, the agents' action
tries, the event bus's handlers and the RPC client's pending calls share it.

:class:`Slots` is a FIFO semaphore whose uncontended path is a counter (no coroutine
per delivery); :class:`Deadlines` is one timer for many deadlines (a heap), used by
:class:`TimeLimits` (handler tries) and by the RPC client (pending calls).

``asyncio.timeout`` costs a scope object, a timer handle and its cancellation per try
(about 3.5 us under uvloop, a tenth of an in-memory round trip). Here a try costs a
heap entry: :class:`TimeLimits` keeps ``(when, limit)`` in a heap with one timer for the
earliest, and cancels the task of each limit that passes, as ``asyncio.timeout`` does
(``Task.cancel``, then ``uncancel`` to tell its own cancellation from anyone else's).

:func:`gather_limited` is the bounded fan-out for handlers: many awaitables, at most
``limit`` of them started and unfinished at any moment.

Guarantees: a try whose limit passes is cancelled within one loop step of it; a
cancellation from elsewhere (a stopping worker) is never mistaken for a timeout; the
heap holds at most about four times the running tries (finished entries are pruned).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections import deque
from typing import TYPE_CHECKING, Final, Generic, TypeVar, cast

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

__all__ = ["Deadlines", "Limit", "Slots", "TimeLimits", "gather_limited"]

_PRUNE_SLACK: Final = 1024
"""Finished entries tolerated in the heap beyond four per live item."""

T = TypeVar("T")


class Deadlines(Generic[T]):
    """Items with deadlines and one timer for all of them: a heap of ``(when, item)``.

    ``expire(item, now)`` runs for each item whose deadline passes while it is not
    ``finished(item)``; the owner calls :meth:`release` once per armed item when it
    ends (that count bounds the heap: finished entries are pruned when they outnumber
    the live ones four to one, beyond a slack). Times are the running loop's clock; a
    new loop (tests) starts afresh.
    """

    __slots__ = (
        "_expire",
        "_finished",
        "_heap",
        "_live",
        "_loop",
        "_order",
        "_timer",
        "_timer_at",
    )

    def __init__(self, expire: Callable[[T, float], None], finished: Callable[[T], bool]) -> None:
        self._expire = expire
        self._finished = finished
        self._heap: list[tuple[float, int, T]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        """When the timer fires (``inf`` with no timer)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._live = 0

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the deadlines run on (``None`` before the first)."""
        return self._loop

    def arm(self, when: float, item: T, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Expire ``item`` at ``when`` (loop time) unless it has finished by then.

        ``loop`` is the running loop, when the caller has it at hand (on CPython 3.11
        asking for it makes a ``getpid`` system call).
        """
        if loop is None:
            loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new loop: nothing of the old one applies
            self.clear()
            self._loop = loop
        heap = self._heap
        if len(heap) > 4 * self._live + _PRUNE_SLACK:
            finished = self._finished
            heap[:] = [entry for entry in heap if not finished(entry[2])]
            heapq.heapify(heap)
        heapq.heappush(heap, (when, next(self._order), item))
        self._live += 1
        if when < self._timer_at:  # sooner than the timer (inf when there is none)
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(when, self._sweep)
            self._timer_at = when

    def release(self) -> None:
        """One armed item has ended (its entry is dropped lazily)."""
        if self._live:
            self._live -= 1

    def clear(self) -> None:
        """Forget every deadline and stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_at = math.inf
        self._heap.clear()
        self._live = 0

    def _sweep(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        loop = self._loop
        if loop is None:
            return
        heap = self._heap
        now = loop.time()
        finished = self._finished
        while heap and heap[0][0] <= now:
            item = heapq.heappop(heap)[2]
            if not finished(item):
                self._expire(item, now)
        while heap and finished(heap[0][2]):
            heapq.heappop(heap)
        if heap:
            self._timer_at = heap[0][0]
            self._timer = loop.call_at(self._timer_at, self._sweep)


class Limit:
    """One try's limit: :meth:`TimeLimits.arm` makes it, :meth:`end` releases it."""

    __slots__ = ("_cancelling", "_limits", "_task", "expired", "finished", "fired_at")

    def __init__(self, limits: TimeLimits, task: asyncio.Task[object]) -> None:
        self._limits = limits
        self._task = task
        self._cancelling = task.cancelling()
        self.expired = False
        """The limit passed and the task was cancelled for it."""
        self.fired_at = 0.0
        self.finished = False

    @property
    def task(self) -> asyncio.Task[object]:
        """The task this limit cuts off."""
        return self._task

    def _fire(self, now: float) -> None:
        if not self.finished:
            self.expired = True
            self.fired_at = now
            self._limits._fired.add(self)
            self._task.cancel()

    def end(self, error: BaseException | None) -> bool:
        """The try ended (``error``: how). True if it ended *because* the limit passed.

        A cancellation this limit caused is taken back (``uncancel``), so the task
        runs on; one requested by anyone else as well still propagates.
        """
        self.finished = True
        limits = self._limits
        limits._deadlines.release()
        limits._fired.discard(self)
        if not self.expired:
            return False
        timed_out = self._task.uncancel() <= self._cancelling
        return timed_out and isinstance(error, asyncio.CancelledError)


class TimeLimits:
    """Cuts tries off when their time runs out, on the running loop's clock."""

    __slots__ = ("_deadlines", "_fired")

    def __init__(self) -> None:
        self._fired: set[Limit] = set()
        """Limits that cut their task off, until it ends (normally at once)."""
        self._deadlines: Deadlines[Limit] = Deadlines(Limit._fire, _finished)

    def arm(self, limit_s: float) -> Limit:
        """Limit the current task's work to ``limit_s`` seconds from now.

        Raises:
            RuntimeError: not called from inside a task.
        """
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("a time limit needs a task to cancel")
        if loop is not self._deadlines.loop:
            self._fired.clear()
        limit = Limit(self, task)
        self._deadlines.arm(loop.time() + limit_s, limit, loop)
        return limit

    def overdue(self, grace_s: float) -> list[Limit]:
        """Limits whose task was cancelled more than ``grace_s`` ago and still runs: a
        handler that ignores (or swallows) cancellation."""
        loop = self._deadlines.loop
        if not self._fired or loop is None:
            return []
        now = loop.time()
        return [limit for limit in self._fired if now - limit.fired_at > grace_s]


def _finished(limit: Limit) -> bool:
    return limit.finished


class Slots:
    """At most ``n`` holders at once; waiters are served first come, first served.

    :meth:`try_take` is the hot path (no coroutine, no future); :meth:`take` waits.
    A waiter cancelled after a slot was handed to it passes the slot on, so no
    cancellation ever leaks one.
    """

    __slots__ = ("_free", "_waiters")

    def __init__(self, n: int) -> None:
        self._free = n
        self._waiters: deque[asyncio.Future[None]] = deque()

    def try_take(self) -> bool:
        """Take a slot if one is free and nobody waits before us."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    async def take(self) -> None:
        """Take a slot, waiting for one in turn. Cancellable: then none is taken."""
        if self.try_take():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed over just as we were cancelled: pass it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give a slot back: to the first waiter still waiting, else to the pool."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


async def gather_limited(calls: Iterable[Callable[[], Awaitable[T]]], *, limit: int) -> list[T]:
    """Await ``call()`` for every call, at most ``limit`` at a time; the results in order.

    The seed's ``process_with_limit``, for handlers that fan out::

        replies = await gather_limited(
            [functools.partial(self.rpc.call, "task_manager", "task_add", t) for t in titles],
            limit=5,
        )

    Each call is a zero-argument callable (``functools.partial``, a lambda), made into an
    awaitable only when a slot is free: no coroutine is created that might never be
    awaited. ``limit`` tasks take the calls in order, so at most ``limit`` run at once.
    They are children of the calling task: they see its context (a handler's message
    context, and so its deadline and priority, and its trace), and are cancelled with it.

    Raises:
        ValueError: ``limit`` is below 1.
        Exception: the first exception a call raised; the calls still running are
            cancelled first, and the ones not started never start.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    todo = list(enumerate(calls))
    results: list[T | None] = [None] * len(todo)
    queue = iter(todo)

    async def take_turns() -> None:
        for index, call in queue:  # a shared iterator: each call is taken once
            results[index] = await call()

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(limit, len(todo))):
                group.create_task(take_turns())
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return cast("list[T]", results)  # every slot was filled
