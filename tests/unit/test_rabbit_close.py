"""Closing a channel or connection is bounded even when the close ignores cancellation."""

from __future__ import annotations

import asyncio
import time

import pytest

from amqp_agents.transport.rabbit.consumer import close_within


async def test_a_close_that_ignores_cancellation_is_abandoned_at_the_bound() -> None:
    """``wait_for`` would wait for the cancelled close to finish, forever here."""
    release = asyncio.Event()
    ended = asyncio.Event()

    async def stubborn_close() -> None:
        try:
            while not release.is_set():
                try:
                    await release.wait()
                except asyncio.CancelledError:
                    continue  # a close stuck on a stalled socket
        finally:
            ended.set()

    started = time.monotonic()
    await close_within(stubborn_close(), 0.05)
    assert time.monotonic() - started < 1.0
    assert not ended.is_set(), "abandoned, not awaited"
    release.set()
    await asyncio.wait_for(ended.wait(), 1)


async def test_link_errors_of_a_close_are_ignored_and_others_raised() -> None:
    async def reset() -> None:
        raise ConnectionResetError("gone")

    async def bug() -> None:
        raise ValueError("a bug, not a dying link")

    await close_within(reset(), 1)
    with pytest.raises(ValueError, match="a bug"):
        await close_within(bug(), 1)
