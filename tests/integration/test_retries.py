"""Retries and dead letters on the real broker: delay tiers, killer messages, replays, CLI.

The scenarios shared with ``tests/unit/test_retries.py`` (in memory) live in
``tests/agents_for_tests.py``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from amqp_agents.config import RetryPolicy
from amqp_agents.errors import QueueNotFoundError
from amqp_agents.models.topology import Topology
from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.dead_letters import DeadLetters
from amqp_agents.testing import BrokerAdmin
from amqp_agents.transport.rabbitmq import RabbitTransport
from tests.agents_for_tests import (
    FAST_BACKOFF,
    CliProcess,
    Flaky,
    cli_env,
    read_ids,
    rig,
    run_cli,
    scenario_deadline_bounds_backoff,
    scenario_deadline_bounds_redelivery,
    scenario_oversized_request,
    scenario_peek_and_replay,
    scenario_poison_is_dead_lettered,
    scenario_retry_after_delay,
)
from tests.support import wait_until

Connect = Callable[..., Awaitable[RabbitTransport]]
Unique = Callable[[str], str]
TOPOLOGY = Topology()


def ladder(attempts: int) -> RetryPolicy:
    """Three deliveries, 0.2 s then 0.4 s apart, ``attempts`` tries each."""
    return RetryPolicy(
        attempts=attempts,
        backoff_initial_s=FAST_BACKOFF,
        redelivery_delays_s=(0.2, 0.4),
        max_deliveries=3,
    )


@pytest.mark.parametrize("attempts", [1, 2], ids=["1-try", "2-tries"])
async def test_poison_message_is_dead_lettered_after_max_deliveries(
    connect: Connect, unique: Unique, attempts: int
) -> None:
    """A handler that always raises RetryableError: dead after max_deliveries, others served."""
    async with rig(connect, Flaky(name=unique("poison")), ladder(attempts)) as r:
        await scenario_poison_is_dead_lettered(r, timeout_s=20)


async def test_retry_with_a_delay_goes_through_the_smallest_tier_that_honours_it(
    connect: Connect, unique: Unique
) -> None:
    """Retry(delay_s=0.2): one redelivery via the 250 ms tier, none in process, priority kept."""
    policy = RetryPolicy(
        attempts=3,
        backoff_initial_s=FAST_BACKOFF,
        redelivery_delays_s=(0.05, 0.1, 0.25, 1.0),
        max_deliveries=3,
    )
    async with rig(connect, Flaky(name=unique("later")), policy) as r:
        await scenario_retry_after_delay(r, delay_s=0.2, tier_ms=250, timeout_s=10)


@pytest.mark.parametrize(("delay_s", "deliveries"), [(2.0, 1), (0.3, 2)])
async def test_redelivery_never_outlives_the_callers_deadline(
    connect: Connect, unique: Unique, delay_s: float, deliveries: int
) -> None:
    """0.5 s deadline: no redelivery that would end past it; dead-lettered, answered in time."""
    policy = RetryPolicy(attempts=1, redelivery_delays_s=(delay_s,), max_deliveries=4)
    async with rig(connect, Flaky(name=unique("deadline")), policy) as r:
        await scenario_deadline_bounds_redelivery(r, timeout_s=0.5, deliveries=deliveries)


async def test_in_process_backoff_never_outlives_the_callers_deadline(
    connect: Connect, unique: Unique
) -> None:
    """50 tries with backoffs up to 0.3 s and a 0.6 s deadline: stops and answers in time."""
    policy = RetryPolicy(attempts=50, backoff_initial_s=0.05, backoff_max_s=0.3, max_deliveries=1)
    async with rig(connect, Flaky(name=unique("backoff")), policy) as r:
        await scenario_deadline_bounds_backoff(r, timeout_s=0.6)


async def test_oversized_request_is_refused_and_dead_lettered(
    connect: Connect, unique: Unique
) -> None:
    """A raw request over max_message_bytes: MESSAGE_TOO_LARGE reply, one dead letter."""
    async with rig(connect, Flaky(name=unique("big")), ladder(1), max_message_bytes=2048) as r:
        await scenario_oversized_request(r, max_bytes=2048)


# -- dead letters ---------------------------------------------------------------------------


async def test_dead_letters_peek_and_replay(connect: Connect, unique: Unique) -> None:
    """peek keeps dead letters in place and in order; replay(limit) sends the oldest back."""
    async with rig(connect, Flaky(name=unique("dead")), ladder(1)) as r:
        await scenario_peek_and_replay(r)


async def test_dead_letters_cli_lists_and_replays(
    connect: Connect, unique: Unique, amqp_url: str
) -> None:
    """`amqp-agents dead-letters AGENT` lists reasons as JSON lines; --replay N sends N back."""
    agent = Flaky(name=unique("cli"))
    env = cli_env()

    async def cli(*args: str) -> tuple[int, list[str], str]:
        done = await asyncio.to_thread(
            run_cli, "--url", amqp_url, "--log-level", "WARNING", "dead-letters", *args, env=env
        )
        return done.returncode, done.stdout.splitlines(), done.stderr

    async with rig(connect, agent, ladder(1)) as r:
        for item in (1, 2, 3):
            reply = await r.client.send(agent.name, "broken", {"id": item}, timeout_s=5)
            assert reply.code == "INTERNAL_ERROR", reply

        code, lines, err = await cli(agent.name)
        assert code == 0, err
        assert lines[0] == f"3 dead letter(s) for {agent.name}, oldest 3:"
        listed = [json.loads(line) for line in lines[1:]]
        assert [json.loads(x["body"])["id"] for x in listed] == [1, 2, 3]
        for letter in listed:
            assert (letter["action"], letter["error"], letter["attempts"]) == (
                "broken",
                "INTERNAL_ERROR",
                1,
            )
            assert "failed" in letter["message"]
            assert isinstance(letter["at_ms"], int)
            assert letter["message_id"]

        code, lines, err = await cli(agent.name, "--limit", "2")
        assert code == 0, err
        assert lines[0] == f"3 dead letter(s) for {agent.name}, oldest 2:"
        assert [json.loads(json.loads(x)["body"])["id"] for x in lines[1:]] == [1, 2]
        assert await r.ready(r.dead_queue) == 3  # listing takes nothing away

        agent.fixed = True
        code, lines, err = await cli(agent.name, "--replay", "2")
        assert code == 0, err
        assert [json.loads(line) for line in lines] == [
            {"agent": agent.name, "replayed": 2, "left": 1}
        ]
        await wait_until(
            lambda: agent.answered == [("broken", 1), ("broken", 2)],
            timeout_s=5,
            what="the replayed requests to be handled",
        )

        for bad in (["--replay", "0"], ["--limit", "0"], ["--limit", "many"], ["--replay", "-1"]):
            code, _lines, err = await cli(agent.name, *bad)
            assert code == 2, f"{bad}: exit {code}, {err}"
        code, _lines, err = await cli("not an agent!")
        assert code == 2, err
        assert "invalid agent name" in err
        assert await r.ready(r.dead_queue) == 1


async def test_dead_letters_cli_refuses_a_bad_limit_on_an_empty_queue(
    connect: Connect, unique: Unique, amqp_url: str
) -> None:
    """--limit 0 is bad usage (exit 2) whether or not there are dead letters."""
    async with rig(connect, Flaky(name=unique("empty")), ladder(1)) as r:
        assert await r.ready(r.dead_queue) == 0
        done = await asyncio.to_thread(
            run_cli, "--url", amqp_url, "dead-letters", r.agent.name, "--limit", "0", env=cli_env()
        )
    assert done.returncode == 2, done.stdout + done.stderr


async def test_peeking_and_replaying_do_not_leak_channels(
    connect: Connect, unique: Unique, broker_admin: BrokerAdmin
) -> None:
    """Ten peeks and replays leave the consuming connection with as many channels as before."""
    client_name = unique("dead-letters")
    transport = await connect(client_name=client_name)

    def channels() -> int:
        """Open channels of the transport's consuming connection."""
        out = broker_admin.run(
            "list_connections", "--no-table-headers", "client_properties", "channels"
        )
        marker = f'"{client_name}/consume"'
        [count] = [int(line.rsplit("\t", 1)[1]) for line in out.splitlines() if marker in line]
        return count

    async with rig(connect, Flaky(name=unique("leak")), ladder(1)) as r:
        for item in (1, 2):
            await r.client.send(r.agent.name, "broken", {"id": item}, timeout_s=5)
        letters = DeadLetters(transport, timeout_s=5)

        async def in_place() -> bool:  # peek's requeues are not awaited: let them land
            return await letters.count(r.agent.name) == 2

        await letters.peek(r.agent.name)  # opens what a first use needs
        await wait_until(in_place, timeout_s=5, what="the dead letters back in place")
        before = await asyncio.to_thread(channels)
        for _ in range(10):
            assert len(await letters.peek(r.agent.name)) == 2
            await wait_until(in_place, timeout_s=5, what="the dead letters back in place")
        assert await letters.replay(r.agent.name, limit=1) == 1
        after = await asyncio.to_thread(channels)
    assert after == before, f"open channels {before} -> {after}"


# -- a message that kills the worker --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_a_message_that_kills_the_worker_is_dead_lettered_after_max_deliveries(
    connect: Connect, unique: Unique, amqp_url: str, tmp_path: Path
) -> None:
    """os._exit in a handler: each death counts; after max_deliveries it is dead-lettered."""
    max_deliveries = 3
    name = unique("crasher")
    queue = TOPOLOGY.agent_queue(name)
    record = tmp_path / "handled.txt"
    env = cli_env(
        AAT_AGENT_NAME=name,
        AAT_RECORD_PATH=str(record),
        AMQP_AGENTS_WORKER__RETRY__MAX_DELIVERIES=str(max_deliveries),
    )
    args = ["--url", amqp_url, "run", "tests.agents_for_tests:crasher", "--concurrency", "1"]
    transport = await connect()

    async def consuming(worker: CliProcess) -> bool:
        worker.running()
        try:
            return (await transport.queue_info(queue)).consumers == 1
        except QueueNotFoundError:
            return False

    def start() -> CliProcess:
        return CliProcess(args, env=env, log_dir=tmp_path / "logs")

    worker = start()
    await wait_until(lambda: consuming(worker), timeout_s=20, what="the worker to consume")
    try:
        async with RpcClient(transport) as client:
            killer = asyncio.create_task(
                client.send(name, "work", {"id": 0, "crash": True}, timeout_s=100)
            )
            others: list[asyncio.Task[object]] = []
            for death in range(1, max_deliveries + 1):
                code = await worker.await_exit(20)
                assert code == 1, f"death {death}: exit {code}\n{worker.output()}"
                worker.close()
                others.append(
                    asyncio.create_task(client.send(name, "work", {"id": death}, timeout_s=60))
                )
                worker = start()  # it takes the killer again at once: it may die soon
            async with asyncio.timeout(30):
                reply = await killer
            assert reply.error is not None, reply
            assert reply.error.code == "INTERNAL_ERROR"
            assert f"delivered {max_deliveries} times" in reply.error.message
            assert "may crash the worker" in reply.error.message
            async with asyncio.timeout(30):
                answers = await asyncio.gather(*others)
            assert all(getattr(a, "ok", False) for a in answers), answers
            after = await client.send(name, "work", {"id": 99}, timeout_s=10)
            assert after.ok, after
        assert worker.running()
        assert read_ids(record).count(0) == max_deliveries, read_ids(record)
        letters = DeadLetters(transport, timeout_s=5)
        [letter] = await letters.peek(name)
        assert (letter.error_code, letter.attempts) == ("INTERNAL_ERROR", max_deliveries)
        assert "may crash the worker" in (letter.error_message or "")
        assert json.loads(letter.body) == {"id": 0, "crash": True}
        assert (await transport.queue_info(queue)).messages == 0
        worker.terminate()
        assert await worker.await_exit(30) == 0, worker.output()
    finally:
        worker.close()
