"""Bounded waits for test conditions that no event announces.

The rule: no sleeps where an event exists. When the code under test offers an
``asyncio.Event``, a future or a queue, await that (under ``asyncio.timeout``). Poll with
these helpers only for state that changes without notice: a queue's depth on the broker,
a counter, a file a subprocess writes, a socket the loop closes, a process's exit.

* :func:`wait_until`: on the event loop; the predicate may be sync or async.
* :func:`wait_until_sync`: off the loop (sync tests, threads, subprocesses).
* :func:`wait_for_tasks_to_end`: a leak check, built on :func:`wait_until`.

Both always have a bound, return the first truthy value the predicate gave (so a test can
wait for a value and use it), let an exception from the predicate end the wait at once,
and on timeout fail with an ``AssertionError`` naming what was awaited and the last value
seen::

    AssertionError: timed out after 5s waiting for both replies (last value: False)
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypeVar, overload

__all__ = ["Description", "wait_for_tasks_to_end", "wait_until", "wait_until_sync"]

T = TypeVar("T")

Description = str | Callable[[], str]
"""What a wait is for. A callable is called only on timeout, for details known then
(a process's output, the value of a counter)."""

_NOTHING_SEEN = "nothing: the predicate never returned"


@overload
async def wait_until(
    predicate: Callable[[], Awaitable[T]],
    *,
    what: Description,
    timeout_s: float = ...,
    interval_s: float = ...,
) -> T: ...


@overload
async def wait_until(
    predicate: Callable[[], T],
    *,
    what: Description,
    timeout_s: float = ...,
    interval_s: float = ...,
) -> T: ...


async def wait_until(
    predicate: Callable[[], object],
    *,
    what: Description,
    timeout_s: float = 5.0,
    interval_s: float = 0.01,
) -> object:
    """Call ``predicate`` every ``interval_s`` until it returns a truthy value; return it.

    Args:
        predicate: a sync or async callable; its result is awaited when awaitable.
        what: what the test waits for, for the failure message.
        timeout_s: the bound on the whole wait, an async predicate's own time included
            (one that hangs is cut off).
        interval_s: the pause between two calls.

    Raises:
        AssertionError: no truthy value within ``timeout_s``.
    """
    last: object = _NOTHING_SEEN
    try:
        async with asyncio.timeout(timeout_s) as bound:
            while True:
                value = predicate()
                if inspect.isawaitable(value):
                    value = await value
                if value:
                    return value
                last = value
                await asyncio.sleep(interval_s)
    except TimeoutError:
        if not bound.expired():
            raise  # the predicate's own TimeoutError, not this wait's
    raise AssertionError(_timed_out(what, timeout_s, last))


def wait_until_sync(
    predicate: Callable[[], T],
    *,
    what: Description,
    timeout_s: float = 5.0,
    interval_s: float = 0.05,
) -> T:
    """:func:`wait_until` for code off the event loop: blocks, sleeping between calls.

    The bound is checked between calls: a predicate that blocks is not cut off.

    Raises:
        AssertionError: no truthy value within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(_timed_out(what, timeout_s, value))
        time.sleep(interval_s)


async def wait_for_tasks_to_end(
    running: Callable[[], Collection[asyncio.Task[Any]]],
    *,
    timeout_s: float,
    interval_s: float = 0.01,
) -> None:
    """:func:`wait_until` ``running()`` is empty: a leak check for tasks a test started.

    Raises:
        AssertionError: naming the coroutines of the tasks still running at the bound.
    """

    def names() -> list[str]:
        return sorted(getattr(t.get_coro(), "__qualname__", repr(t)) for t in running())

    await wait_until(
        lambda: not running(),
        timeout_s=timeout_s,
        interval_s=interval_s,
        what=lambda: f"the tasks to end ({names()} still run)",
    )


def _timed_out(what: Description, timeout_s: float, last: object) -> str:
    described = what() if callable(what) else what
    shown = last if last is _NOTHING_SEEN else repr(last)
    return f"timed out after {timeout_s:g}s waiting for {described} (last value: {shown})"
