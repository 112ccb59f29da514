"""A :class:`~amqp_agents.examples.tasks.TaskStore` in Redis, shared by every replica.

Needs the ``redis`` package (``pip install 'amqp-agents[redis]'``). Keys, all under
``key_prefix``::

    <prefix>task:<id>   the task as JSON
    <prefix>order       a list of task ids, oldest first

``add`` writes both in one ``MULTI``/``EXEC`` transaction, so a listed id always has
its task; ``save`` only replaces a task that exists (``SET ... XX``).
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.exceptions import RedisError

from amqp_agents.config import redact_url
from amqp_agents.errors import BrokerUnavailableError
from amqp_agents.examples.tasks import Task, new_task_id

__all__ = ["RedisTaskStore"]

_TIMEOUT_S = 5.0
"""Bound on connecting and on each command: a stalled Redis fails a request, never
hangs it."""


class RedisTaskStore:
    """Tasks in Redis under ``key_prefix`` (``tasks:`` by default)."""

    def __init__(self, url: str, *, key_prefix: str = "tasks:") -> None:
        self._url = url
        self._prefix = key_prefix
        self._redis: Redis = Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=_TIMEOUT_S,
            socket_timeout=_TIMEOUT_S,
        )

    def _task_key(self, task_id: str) -> str:
        return f"{self._prefix}task:{task_id}"

    @property
    def _order_key(self) -> str:
        return f"{self._prefix}order"

    async def open(self) -> None:
        """Check that Redis answers.

        Raises:
            BrokerUnavailableError: Redis cannot be reached (the worker does not start).
        """
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            raise BrokerUnavailableError(
                f"cannot reach the task store at {redact_url(self._url)}: {exc}"
            ) from None

    async def add(self, title: str) -> Task:
        task = Task(id=new_task_id(), title=title)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._task_key(task.id), task.model_dump_json())
            pipe.rpush(self._order_key, task.id)
            await pipe.execute()
        return task

    async def get(self, task_id: str) -> Task | None:
        raw = await self._redis.get(self._task_key(task_id))
        return None if raw is None else Task.model_validate_json(raw)

    async def list(self) -> list[Task]:
        ids = [_text(task_id) for task_id in await self._redis.lrange(self._order_key, 0, -1)]
        if not ids:
            return []
        raws = await self._redis.mget([self._task_key(task_id) for task_id in ids])
        return [Task.model_validate_json(raw) for raw in raws if raw is not None]

    async def save(self, task: Task) -> None:
        await self._redis.set(self._task_key(task.id), task.model_dump_json(), xx=True)

    async def aclose(self) -> None:
        """Close the connections (a later command opens new ones)."""
        await self._redis.aclose()


def _text(value: str | bytes) -> str:
    """A reply as text (the client decodes; bytes only if configured otherwise)."""
    return value if isinstance(value, str) else value.decode()
