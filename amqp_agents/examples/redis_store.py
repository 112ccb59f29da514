"""A :class:`~amqp_agents.examples.tasks.TaskStore` in Redis, shared by every replica.

Needs the ``redis`` package (``pip install 'amqp-agents[redis]'``). Keys, all under
``key_prefix``::

    <prefix>task:<id>   the task as JSON
    <prefix>order       a list of task ids, oldest first

``add`` writes both in one ``MULTI``/``EXEC`` transaction, so a listed id always has
its task; ``save`` only replaces a task that exists (``SET ... XX``).

Failures: at start, :meth:`RedisTaskStore.open` waits up to ``open_timeout_s`` for
Redis (it may be starting beside the workers), then fails the worker's start with a
``ConfigurationError`` naming the URL (password redacted): the process exits with code
2 instead of retrying forever. Once running, a command that fails because Redis is
unreachable raises :class:`~amqp_agents.errors.RetryableError` (``UNAVAILABLE``), so
the worker retries the request as its retry policy says; every command is bounded by
a socket timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from redis.asyncio import Redis
from redis.exceptions import RedisError

from amqp_agents.config import redact_url
from amqp_agents.errors import ConfigurationError, RetryableError
from amqp_agents.examples.tasks import Task, new_task_id

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["RedisTaskStore"]

_COMMAND_TIMEOUT_S = 5.0
"""Bound on connecting and on each command: a stalled Redis fails a request, never
hangs it."""


class RedisTaskStore:
    """Tasks in Redis under ``key_prefix`` (``tasks:`` by default)."""

    def __init__(
        self, url: str, *, key_prefix: str = "tasks:", open_timeout_s: float = 30.0
    ) -> None:
        self._url = url
        self._prefix = key_prefix
        self._open_timeout_s = open_timeout_s
        self._redis: Redis = Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=_COMMAND_TIMEOUT_S,
            socket_timeout=_COMMAND_TIMEOUT_S,
        )

    def _task_key(self, task_id: str) -> str:
        return f"{self._prefix}task:{task_id}"

    @property
    def _order_key(self) -> str:
        return f"{self._prefix}order"

    async def open(self) -> None:
        """Wait until Redis answers, at most ``open_timeout_s`` (backoff 0.1-2 s).

        Raises:
            ConfigurationError: Redis did not answer in time (a wrong TASKS_STORE_URL,
                or Redis is down).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._open_timeout_s
        delay = 0.1
        while True:
            try:
                await self._redis.ping()
            except (RedisError, OSError) as exc:
                if loop.time() + delay > deadline:
                    raise ConfigurationError(
                        f"cannot reach the task store at {redact_url(self._url)} within"
                        f" {self._open_timeout_s:g}s: {exc}"
                    ) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            else:
                return

    async def add(self, title: str) -> Task:
        task = Task(id=new_task_id(), title=title)
        with _unavailable_is_retryable():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(self._task_key(task.id), task.model_dump_json())
                pipe.rpush(self._order_key, task.id)
                await pipe.execute()
        return task

    async def get(self, task_id: str) -> Task | None:
        with _unavailable_is_retryable():
            raw = await self._redis.get(self._task_key(task_id))
        return None if raw is None else Task.model_validate_json(raw)

    async def list(self) -> list[Task]:
        with _unavailable_is_retryable():
            ids = [_text(task_id) for task_id in await self._redis.lrange(self._order_key, 0, -1)]
            if not ids:
                return []
            raws = await self._redis.mget([self._task_key(task_id) for task_id in ids])
        return [Task.model_validate_json(raw) for raw in raws if raw is not None]

    async def save(self, task: Task) -> None:
        with _unavailable_is_retryable():
            await self._redis.set(self._task_key(task.id), task.model_dump_json(), xx=True)

    async def aclose(self) -> None:
        """Close the connections (a later command opens new ones)."""
        await self._redis.aclose()


@contextlib.contextmanager
def _unavailable_is_retryable() -> Iterator[None]:
    """Redis down or unreachable: a transient failure the worker may retry."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise RetryableError(f"the task store is unavailable: {exc}") from exc


def _text(value: str | bytes) -> str:
    """A reply as text (the client decodes; bytes only if configured otherwise)."""
    return value if isinstance(value, str) else value.decode()
