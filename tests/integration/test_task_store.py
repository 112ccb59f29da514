"""The example app's Redis task store, and the app scaled out to two worker processes
that share it (real broker, real Redis)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from amqp_agents.errors import ConfigurationError, RetryableError
from amqp_agents.examples.redis_store import RedisTaskStore
from amqp_agents.examples.tasks import Task
from amqp_agents.models.messages import ErrorCode
from amqp_agents.rpc.client import RpcClient
from amqp_agents.testing import url_for_vhost
from amqp_agents.transport.rabbitmq import RabbitTransport
from tests.agents_for_tests import CliProcess, cli_env, run_cli
from tests.support import wait_until

Connect = Callable[..., Awaitable[RabbitTransport]]


async def test_redis_store_keeps_tasks_for_every_connection(
    redis_url: str, redis_prefix: str
) -> None:
    """Two stores on the same Redis and prefix (two replicas) see the same tasks, oldest
    first; saving a task that does not exist creates nothing; reopening after close works."""
    one = RedisTaskStore(redis_url, key_prefix=redis_prefix)
    two = RedisTaskStore(redis_url, key_prefix=redis_prefix)
    other_app = RedisTaskStore(redis_url, key_prefix=f"{redis_prefix}other:")
    for store in (one, two, other_app):
        await store.open()
    try:
        first = await one.add("write the docs")
        second = await two.add("ship it")
        assert first.id != second.id
        assert await two.get(first.id) == first
        await two.save(first.model_copy(update={"completed": True}))
        assert (await one.get(first.id)) == Task(
            id=first.id, title="write the docs", completed=True
        )
        assert [task.id for task in await one.list()] == [first.id, second.id]
        assert await one.get("no-such-task") is None
        await one.save(Task(id="ghost", title="never added"))
        assert await two.get("ghost") is None
        assert await other_app.list() == []
        await one.aclose()
        await one.open()
        assert len(await one.list()) == 2
    finally:
        for store in (one, two, other_app):
            await store.aclose()


async def test_unreachable_redis_fails_at_open_without_the_password() -> None:
    """open() waits up to open_timeout_s, then raises ConfigurationError naming the store,
    its password redacted."""
    store = RedisTaskStore("redis://:hunter2@127.0.0.1:1/0", open_timeout_s=0.3)
    with pytest.raises(ConfigurationError, match="cannot reach the task store") as caught:
        await store.open()
    await store.aclose()
    assert "hunter2" not in str(caught.value)
    assert "within 0.3s" in str(caught.value)


async def test_an_outage_while_running_is_a_retryable_failure(redis_prefix: str) -> None:
    """Commands on an unreachable Redis raise RetryableError (UNAVAILABLE): the worker
    retries them instead of answering INTERNAL_ERROR."""
    store = RedisTaskStore("redis://127.0.0.1:1/0", key_prefix=redis_prefix)
    try:
        with pytest.raises(RetryableError, match="the task store is unavailable"):
            await store.add("x")
        with pytest.raises(RetryableError):
            await store.get("x")
    finally:
        await store.aclose()


def test_a_worker_whose_store_is_unreachable_exits_2_in_one_line(tmp_path: Path) -> None:
    """`run` of the example app with a Redis that never answers: exit 2 and one clear
    line, after the store's open timeout (TASKS_OPEN_TIMEOUT_S; not a reconnect loop)."""
    env = cli_env(TASKS_STORE_URL="redis://127.0.0.1:1/0", TASKS_OPEN_TIMEOUT_S="0.5")
    done = run_cli(
        "--url", "memory://", "run", "amqp_agents.examples.tasks:app", env=env, timeout_s=60
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "amqp-agents:" in line]
    assert errors == [
        "amqp-agents: configuration error: cannot reach the task store at"
        " redis://127.0.0.1:1/0 within 0.5s: Error 111 connecting to 127.0.0.1:1."
        " Connection refused."
    ]
    assert "Traceback" not in done.stderr
    assert "reconnect" not in done.stderr


class _Replica:
    """One `amqp-agents run amqp_agents.examples.tasks:app` process."""

    def __init__(self, url: str, store_env: dict[str, str], log_dir: Path) -> None:
        self.process = CliProcess(
            ["--url", url, "run", "amqp_agents.examples.tasks:app"],
            env={**cli_env(), **store_env},
            log_dir=log_dir,
        )

    async def consuming(self) -> None:
        async def ready() -> bool:
            assert self.process.running(), self.process.output()
            return "consuming agents.task_manager" in self.process.output()

        await wait_until(ready, timeout_s=20, what="a replica to consume")

    async def stop(self) -> None:
        self.process.terminate()
        code = await self.process.await_exit(30)
        assert code == 0, self.process.output()


@pytest.mark.parametrize("store", ["redis", "memory"])
async def test_two_replicas_share_tasks_only_through_redis(
    connect: Connect,
    broker_url: str,
    fresh_vhost: str,
    redis_url: str,
    redis_prefix: str,
    tmp_path: Path,
    store: str,
) -> None:
    """A task added through replica A (the only consumer) is found and completed through
    replica B (then the only consumer), and the other way round. With the in-memory
    store, the control, B answers NOT_FOUND: the test can fail."""
    url = url_for_vhost(broker_url, fresh_vhost)
    store_env = {"TASKS_STORE_URL": redis_url if store == "redis" else "memory://"}
    store_env["TASKS_KEY_PREFIX"] = redis_prefix
    replicas: list[_Replica] = []

    def replica(name: str) -> _Replica:
        replicas.append(_Replica(url, store_env, tmp_path / name))
        return replicas[-1]

    transport = await connect(url)
    try:
        a = replica("a")
        await a.consuming()
        async with RpcClient(transport) as client:
            made_on_a = await client.call("task_manager", "task_add", {"title": "on A"})
            b = replica("b")
            await b.consuming()
            await a.stop()  # from here on B serves every request
            found = await client.send("task_manager", "task_get", {"id": made_on_a["id"]})
            if store == "memory":
                assert found.code == ErrorCode.NOT_FOUND
                return
            assert found.ok, found
            assert found.data == made_on_a
            done = await client.call("task_manager", "task_complete", {"id": made_on_a["id"]})
            assert done == {**made_on_a, "completed": True}
            made_on_b = await client.call("task_manager", "task_add", {"title": "on B"})

            again = replica("a-again")
            await again.consuming()
            await b.stop()  # now A's successor serves
            fetched = await client.call("task_manager", "task_get", {"id": made_on_b["id"]})
            assert fetched == made_on_b
            listed = await client.call("task_manager", "task_list")
            assert listed == {"tasks": [done, made_on_b]}
    finally:
        await transport.aclose()  # before the vhost goes
        for each in replicas:
            each.process.close()
