"""Bounds for handlers: how many run at once, and how long each try may take.

A leaf (it imports nothing of the package): the worker's slots, the agents' action
tries and the event bus's handlers share it.

:class:`Slots` is a FIFO semaphore whose uncontended path is a counter (no coroutine
per delivery); :class:`TimeLimits` gives handler tries time limits with one timer for
all of them instead of one per try.

``asyncio.timeout`` costs a scope object, a timer handle and its cancellation per try
(about 3.5 us under uvloop, a tenth of an in-memory round trip). Here a try costs a
heap entry: :class:`TimeLimits` keeps ``(when, limit)`` in a heap with one timer for the
earliest, and cancels the task of each limit that passes, as ``asyncio.timeout`` does
(``Task.cancel``, then ``uncancel`` to tell its own cancellation from anyone else's).

Guarantees: a try whose limit passes is cancelled within one loop step of it; a
cancellation from elsewhere (a stopping worker) is never mistaken for a timeout; the
heap holds at most about four times the running tries (finished entries are pruned).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from typing import Final

__all__ = ["Limit", "Slots", "TimeLimits"]

_PRUNE_SLACK: Final = 1024
"""Finished entries tolerated in the heap beyond four per running try."""


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
        limits._running = max(limits._running - 1, 0)
        limits._fired.discard(self)
        if not self.expired:
            return False
        timed_out = self._task.uncancel() <= self._cancelling
        return timed_out and isinstance(error, asyncio.CancelledError)


class TimeLimits:
    """Cuts tries off when their time runs out, on the running loop's clock."""

    __slots__ = ("_fired", "_heap", "_loop", "_order", "_running", "_timer")

    def __init__(self) -> None:
        self._fired: set[Limit] = set()
        """Limits that cut their task off, until it ends (normally at once)."""
        self._heap: list[tuple[float, int, Limit]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = 0

    def arm(self, limit_s: float) -> Limit:
        """Limit the current task's work to ``limit_s`` seconds from now.

        Raises:
            RuntimeError: not called from inside a task.
        """
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("a time limit needs a task to cancel")
        if loop is not self._loop:  # a new loop (tests): nothing of the old one applies
            self._reset(loop)
        heap = self._heap
        if len(heap) > 4 * self._running + _PRUNE_SLACK:
            heap[:] = [entry for entry in heap if not entry[2].finished]
            heapq.heapify(heap)
        limit = Limit(self, task)
        when = loop.time() + limit_s
        heapq.heappush(heap, (when, next(self._order), limit))
        self._running += 1
        timer = self._timer
        if timer is None or when < timer.when():
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(when, self._sweep)
        return limit

    def overdue(self, grace_s: float) -> list[Limit]:
        """Limits whose task was cancelled more than ``grace_s`` ago and still runs: a
        handler that ignores (or swallows) cancellation."""
        if not self._fired or self._loop is None:
            return []
        now = self._loop.time()
        return [limit for limit in self._fired if now - limit.fired_at > grace_s]

    def _reset(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._heap.clear()
        self._fired.clear()
        self._running = 0
        self._loop = loop

    def _sweep(self) -> None:
        self._timer = None
        loop = self._loop
        if loop is None:
            return
        heap = self._heap
        now = loop.time()
        while heap and heap[0][0] <= now:
            heapq.heappop(heap)[2]._fire(now)
        while heap and heap[0][2].finished:
            heapq.heappop(heap)
        if heap:
            self._timer = loop.call_at(heap[0][0], self._sweep)


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
