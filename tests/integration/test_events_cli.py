"""``amqp-agents publish`` and ``amqp-agents listen`` as subprocesses, on the real broker."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from amqp_agents.events.bus import EventBus
from amqp_agents.models.topology import Topology
from amqp_agents.transport.base import QueueSpec
from amqp_agents.transport.rabbitmq import RabbitTransport
from tests.agents_for_tests import CliProcess, cli_env, run_cli
from tests.support import wait_until

Connect = Callable[..., Awaitable[RabbitTransport]]
Unique = Callable[[str], str]

TOPOLOGY = Topology()


async def wait_for_listening(listener: CliProcess, *, timeout_s: float = 15.0) -> None:
    """Wait (bounded) for ``listen``'s "listening for" line on stderr; fail if it exits."""
    await wait_until(
        lambda: (
            listener.running()
            and "listening for" in listener.stderr_path.read_text(errors="replace")
        ),
        timeout_s=timeout_s,
        what=lambda: f"listen to start:\n{listener.output()}",
    )


async def cli_publish(url: str, event_type: str, payload: str) -> dict[str, Any]:
    """``amqp-agents publish``; returns its JSON output, failing on a non-zero exit."""
    done = await asyncio.to_thread(
        run_cli, "--url", url, "publish", event_type, payload, env=cli_env()
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def printed_events(listener: CliProcess) -> list[dict[str, Any]]:
    """The JSON lines ``listen`` printed on stdout."""
    text = listener.stdout_path.read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture
async def open_bus(connect: Connect) -> AsyncIterator[Callable[[], Awaitable[EventBus]]]:
    """``await open_bus()`` -> a started bus on the module vhost, closed after the test."""
    buses: list[EventBus] = []

    async def open_() -> EventBus:
        bus = EventBus(await connect())
        await bus.start()
        buses.append(bus)
        return bus

    yield open_
    for bus in buses:
        await bus.aclose()


async def test_listen_prints_only_matching_events_published_with_the_cli(
    amqp_url: str, unique: Unique, tmp_path: Path
) -> None:
    """listen 'P.*' --count 2 prints the two matching events as JSON lines, not the others."""
    prefix = unique("t")
    args = ["--url", amqp_url, "listen", f"{prefix}.*", "--count", "2", "--duration", "10"]
    listener = CliProcess(args, env=cli_env(), log_dir=tmp_path)
    try:
        await wait_for_listening(listener)
        # Non-matching ones first: had the listener counted them, it would exit too early.
        await cli_publish(amqp_url, f"{prefix}.too.deep", '{"n": 0}')
        await cli_publish(amqp_url, f"{unique('other')}.created", '{"n": 0}')
        first = await cli_publish(amqp_url, f"{prefix}.created", '{"n": 1}')
        second = await cli_publish(amqp_url, f"{prefix}.completed", '{"n": 2, "tags": ["x"]}')
        code = await listener.await_exit(15)
    finally:
        listener.close()

    assert code == 0, listener.output()
    assert first == {"published": f"{prefix}.created", "id": first["id"]}
    events = printed_events(listener)
    assert sorted((e["type"], e["id"]) for e in events) == sorted(
        [(f"{prefix}.created", first["id"]), (f"{prefix}.completed", second["id"])]
    )
    assert sorted(e["payload"]["n"] for e in events) == [1, 2]
    assert all(e["timestamp"] for e in events)


async def test_listen_with_a_group_gets_events_queued_before_it_started(
    amqp_url: str, open_bus: Callable[[], Awaitable[EventBus]], unique: Unique, tmp_path: Path
) -> None:
    """listen --group reads the durable group queue, so earlier events are printed too."""
    prefix, group = unique("t"), unique("cli")
    bus = await open_bus()

    async def ignore() -> None:
        return None

    await bus.unsubscribe(await bus.subscribe(f"{prefix}.*", ignore, group=group))
    ids = [await bus.publish(f"{prefix}.queued", {"n": n}) for n in range(2)]

    args = ["--url", amqp_url, "listen", f"{prefix}.*", "--group", group, "--count", "2"]
    listener = CliProcess([*args, "--duration", "10"], env=cli_env(), log_dir=tmp_path)
    try:
        code = await listener.await_exit(15)
    finally:
        listener.close()

    assert code == 0, listener.output()
    assert sorted(e["id"] for e in printed_events(listener)) == sorted(ids)


async def test_listen_exits_after_its_duration_without_events(
    amqp_url: str, unique: Unique, tmp_path: Path
) -> None:
    """--duration bounds a quiet listen: exit 0, nothing printed."""
    args = ["--url", amqp_url, "listen", f"{unique('t')}.*", "--duration", "0.5"]
    listener = CliProcess(args, env=cli_env(), log_dir=tmp_path)
    try:
        code = await listener.await_exit(15)
    finally:
        listener.close()
    assert code == 0, listener.output()
    assert printed_events(listener) == []


@pytest.mark.parametrize("payload", ["{not json", "[1, 2]", '"text"'])
async def test_publish_with_a_payload_that_is_not_a_json_object_exits_2(
    amqp_url: str, connect: Connect, unique: Unique, payload: str
) -> None:
    """publish TYPE with invalid JSON or a non-object exits 2 and publishes nothing."""
    event_type = f"{unique('t')}.bad"
    transport = await connect()
    queue = await transport.declare_queue(
        QueueSpec(name="", durable=False, exclusive=True, auto_delete=True)
    )
    await transport.bind_queue(queue, TOPOLOGY.events_exchange, event_type)

    done = await asyncio.to_thread(
        run_cli, "--url", amqp_url, "publish", event_type, payload, env=cli_env()
    )

    assert done.returncode == 2, done.stdout + done.stderr
    assert "configuration error" in done.stderr
    assert done.stdout == ""
    assert (await transport.queue_info(queue)).messages == 0  # the process has exited


async def test_listen_count_takes_no_more_than_count_events_from_a_group(
    amqp_url: str,
    connect: Connect,
    open_bus: Callable[[], Awaitable[EventBus]],
    unique: Unique,
    tmp_path: Path,
) -> None:
    """listen --group G --count 2 over a backlog of 20: prints 2, leaves 18 queued."""
    prefix, group, backlog = unique("t"), unique("cli"), 20
    bus = await open_bus()

    async def ignore() -> None:
        return None

    await bus.unsubscribe(await bus.subscribe(f"{prefix}.*", ignore, group=group))
    for n in range(backlog):
        await bus.publish(f"{prefix}.queued", {"n": n})

    args = ["--url", amqp_url, "listen", f"{prefix}.*", "--group", group, "--count", "2"]
    listener = CliProcess([*args, "--duration", "10"], env=cli_env(), log_dir=tmp_path)
    try:
        code = await listener.await_exit(15)
    finally:
        listener.close()
    assert code == 0, listener.output()

    transport = await connect()
    left = (await transport.queue_info(TOPOLOGY.group_queue(group))).messages
    assert (len(printed_events(listener)), left) == (2, backlog - 2)


async def test_listen_ends_with_a_summary_on_stderr(amqp_url: str) -> None:
    """`listen --count 1` prints the event on stdout, then one summary line on stderr."""
    listener = asyncio.create_task(
        asyncio.to_thread(
            run_cli, "--url", amqp_url, "listen", "summary.*", "--count", "1", env=cli_env()
        )
    )
    try:
        deadline = time.monotonic() + 15
        published = False
        while not listener.done() and time.monotonic() < deadline:
            await cli_publish(amqp_url, "summary.seen", '{"n": 1}')
            published = True
            await asyncio.wait({listener}, timeout=0.5)
        result = await asyncio.wait_for(listener, 20)
    finally:
        listener.cancel()
    assert published
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[0])["type"] == "summary.seen"
    summary = result.stderr.strip().splitlines()[-1]
    assert summary.startswith("listened for 'summary.*' ")
    assert summary.endswith(": 1 event(s); --count 1 reached")


def test_listen_duration_summary(amqp_url: str) -> None:
    """`listen --duration 0.3` ends by itself with exit 0 and says why."""
    result = run_cli("--url", amqp_url, "listen", "quiet.#", "--duration", "0.3", env=cli_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr.strip().splitlines()[-1].endswith(": 0 event(s); --duration 0.3s passed")
