"""The tests' bounded waits (tests/support.py): they return, time out and report as documented."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.support import wait_for_tasks_to_end, wait_until, wait_until_sync


async def test_wait_until_returns_the_first_truthy_value_of_a_sync_predicate() -> None:
    calls = iter([0, [], "ready"])

    assert await wait_until(lambda: next(calls), what="the third call", interval_s=0) == "ready"


async def test_wait_until_awaits_an_async_predicate() -> None:
    seen: list[int] = []

    async def third() -> int | None:
        seen.append(len(seen))
        return 7 if len(seen) == 3 else None

    assert await wait_until(third, what="the third call", interval_s=0) == 7
    assert seen == [0, 1, 2]


async def test_wait_until_fails_naming_what_it_waited_for_and_the_last_value() -> None:
    with pytest.raises(
        AssertionError,
        match=r"^timed out after 0\.05s waiting for some replies \(last value: \[\]\)$",
    ):
        await wait_until(lambda: [], what="some replies", timeout_s=0.05)


async def test_wait_until_calls_a_callable_description_only_on_timeout() -> None:
    described: list[str] = []

    def what() -> str:
        described.append("called")
        return "a flag (output: none)"

    await wait_until(lambda: True, what=what)
    assert described == []
    with pytest.raises(AssertionError, match=r"waiting for a flag \(output: none\)"):
        await wait_until(lambda: False, what=what, timeout_s=0.02)
    assert described == ["called"]


async def test_wait_until_cuts_off_an_async_predicate_that_hangs() -> None:
    async def hangs() -> bool:
        await asyncio.Event().wait()
        return True

    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"last value: nothing: the predicate never returned"):
        await wait_until(hangs, what="an answer", timeout_s=0.05)
    assert time.monotonic() - started < 1


async def test_wait_until_lets_the_predicates_own_errors_through() -> None:
    async def times_out() -> bool:
        raise TimeoutError("the predicate's own")

    with pytest.raises(TimeoutError, match="the predicate's own"):
        await wait_until(times_out, what="never", timeout_s=5)
    with pytest.raises(ZeroDivisionError):
        await wait_until(lambda: 1 / 0, what="never", timeout_s=5)


def test_wait_until_sync_returns_the_value_and_fails_with_the_last_one() -> None:
    calls = iter([None, 0, 42])
    assert wait_until_sync(lambda: next(calls), what="42", interval_s=0) == 42

    with pytest.raises(
        AssertionError, match=r"^timed out after 0\.02s waiting for a file \(last value: ''\)$"
    ):
        wait_until_sync(lambda: "", what="a file", timeout_s=0.02, interval_s=0.005)


async def test_wait_for_tasks_to_end_names_the_tasks_left() -> None:
    async def lingers() -> None:
        await asyncio.Event().wait()

    task = asyncio.create_task(lingers())
    try:
        with pytest.raises(AssertionError, match=r"the tasks to end \(\[.*lingers'\] still run\)"):
            await wait_for_tasks_to_end(lambda: {task}, timeout_s=0.02)
    finally:
        task.cancel()
    await wait_for_tasks_to_end(lambda: {t for t in [task] if not t.done()}, timeout_s=1)
