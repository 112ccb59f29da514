"""The bounds: Slots (concurrency), Deadlines (one timer for many) and TimeLimits."""

from __future__ import annotations

import asyncio

import pytest

from amqp_agents.bounds import Deadlines, Slots, TimeLimits


async def test_slots_admit_n_holders_then_serve_waiters_in_order() -> None:
    slots = Slots(2)
    assert slots.try_take()
    assert slots.try_take()
    assert not slots.try_take()
    order: list[int] = []

    async def wait(n: int) -> None:
        await slots.take()
        order.append(n)

    waiters = [asyncio.create_task(wait(n)) for n in range(3)]
    await asyncio.sleep(0)
    assert order == []
    slots.release()
    await asyncio.sleep(0)
    assert order == [0]
    slots.release()
    slots.release()
    await asyncio.gather(*waiters)
    assert order == [0, 1, 2]
    assert not slots.try_take(), "three holders now: every slot is taken"


async def test_a_cancelled_waiter_takes_no_slot() -> None:
    slots = Slots(1)
    assert slots.try_take()
    waiter = asyncio.create_task(slots.take())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    slots.release()
    assert slots.try_take(), "the slot went back to the pool, not to the cancelled waiter"


async def test_a_waiter_cancelled_as_the_slot_arrives_passes_it_on() -> None:
    """release() hands the slot to the first waiter; that waiter is cancelled before it
    runs: the slot goes to the next waiter instead of leaking."""
    slots = Slots(1)
    assert slots.try_take()
    first = asyncio.create_task(slots.take())
    second = asyncio.create_task(slots.take())
    await asyncio.sleep(0)
    slots.release()  # handed to `first`, which has not run yet
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1)
    assert not slots.try_take()
    slots.release()
    assert slots.try_take()


async def test_a_try_over_its_limit_is_cancelled_and_reported_as_timed_out() -> None:
    limits = TimeLimits()
    limit = limits.arm(0.01)
    with pytest.raises(asyncio.CancelledError) as caught:
        await asyncio.sleep(5)
    assert limit.end(caught.value) is True
    assert limit.expired
    await asyncio.sleep(0)  # the task runs on: the cancellation was taken back


async def test_a_try_within_its_limit_is_not_cancelled() -> None:
    limits = TimeLimits()
    limit = limits.arm(5)
    await asyncio.sleep(0.01)
    assert limit.end(None) is False
    assert not limit.expired


async def test_an_outside_cancellation_is_not_a_timeout() -> None:
    """A task cancelled by someone else (a stopping worker) before its limit passes:
    the cancellation propagates, it does not count as timed out, and the limit that
    passes later cancels nothing."""
    limits = TimeLimits()
    outcome: list[bool] = []
    entered = asyncio.Event()

    async def work() -> None:
        limit = limits.arm(0.02)
        entered.set()
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError as exc:
            outcome.append(limit.end(exc))
            raise

    task = asyncio.create_task(work())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert outcome == [False]
    assert task.cancelling() == 1, "the outside cancellation was not taken back"
    bystander = asyncio.create_task(asyncio.sleep(0.05))
    await bystander  # the limit's time passes while nothing it guards runs
    assert not bystander.cancelled()


async def test_the_heap_of_limits_stays_bounded() -> None:
    """Finished entries are pruned: 10,000 short tries with a long limit leave a heap
    of about the prune slack, not 10,000 entries."""
    limits = TimeLimits()
    for _ in range(10_000):
        limits.arm(3600).end(None)
    assert len(limits._deadlines._heap) <= 1100


async def test_arm_outside_a_task_is_refused() -> None:
    limits = TimeLimits()
    loop = asyncio.get_running_loop()
    future: asyncio.Future[BaseException] = loop.create_future()

    def outside() -> None:
        try:
            limits.arm(1)
        except RuntimeError as exc:
            future.set_result(exc)

    loop.call_soon(outside)
    assert "needs a task" in str(await future)


async def test_deadlines_expire_in_order_and_skip_finished_items() -> None:
    """Each item whose deadline passes is expired once, earliest first; an item that
    finished before its deadline is not."""
    expired: list[str] = []
    done: set[str] = set()
    all_expired = asyncio.Event()

    def expire(item: str, _now: float) -> None:
        expired.append(item)
        if len(expired) == 2:
            all_expired.set()

    deadlines: Deadlines[str] = Deadlines(expire, done.__contains__)
    now = asyncio.get_running_loop().time()
    deadlines.arm(now + 0.03, "late")
    deadlines.arm(now + 0.01, "early")
    deadlines.arm(now + 0.02, "finished")
    done.add("finished")
    await asyncio.wait_for(all_expired.wait(), timeout=5)
    assert expired == ["early", "late"]


async def test_deadlines_stay_bounded_and_clear_stops_the_timer() -> None:
    """Released entries are pruned (heap near the slack, not 10,000); clear() leaves no
    timer and no entry, so nothing expires after it."""
    done: set[int] = set()
    expired: list[int] = []
    deadlines: Deadlines[int] = Deadlines(
        lambda item, _now: expired.append(item), done.__contains__
    )
    now = asyncio.get_running_loop().time()
    for item in range(10_000):
        deadlines.arm(now + 3600, item)
        done.add(item)
        deadlines.release()
    assert len(deadlines._heap) <= 1100
    deadlines.arm(now, -1)
    deadlines.clear()
    assert deadlines._timer is None
    await asyncio.sleep(0)  # one loop turn: a timer left behind would have fired
    assert expired == []
