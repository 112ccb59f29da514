"""`amqp-agents run --processes 2` on the real broker: two children share the work, one
killed under load is replaced with nothing lost, SIGTERM stops them all (issue 20).

The ledger is idempotent, as in the fault tests: every call must be answered, and every
id called must have been handled at least once (a request in flight in the killed child
is redelivered to the other one, and may be handled twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from amqp_agents.cli.scrape import get
from amqp_agents.models.topology import Topology
from amqp_agents.rpc.client import RpcClient
from amqp_agents.testing import BrokerAdmin, url_for_vhost
from amqp_agents.transport.rabbitmq import RabbitTransport
from tests.agents_for_tests import CliProcess, alive, cli_env, free_port, read_ids
from tests.support import wait_until

Connect = Callable[..., Awaitable[RabbitTransport]]
CALLERS = 8


def children_of(pid: int) -> list[int]:
    """The pids of a process's children (Linux: /proc)."""
    with contextlib.suppress(FileNotFoundError):
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


async def handled_by_process(port: int, agent: str) -> dict[str, float]:
    """``{process: work requests handled ok}`` from the parent's one /metrics page."""
    response = await get(port, "/metrics", timeout_s=5)
    assert response is not None
    assert response.status == 200
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "amqp_agents_messages_handled_total" and (
                labels["agent"],
                labels["action"],
                labels["outcome"],
            ) == (agent, "work", "ok"):
                counts[labels["process"]] = sample.value
    return counts


async def test_two_processes_share_the_work_a_killed_one_is_replaced_and_sigterm_stops_all(
    connect: Connect,
    unique: Callable[[str], str],
    broker_url: str,
    fresh_vhost: str,
    broker_admin: BrokerAdmin,
    tmp_path: Path,
) -> None:
    name, record, port = unique("procs"), tmp_path / "ids", free_port()
    url = url_for_vhost(broker_url, fresh_vhost)
    queue = Topology().agent_queue(name)
    env = cli_env(AAT_AGENT_NAME=name, AAT_RECORD_PATH=str(record), AAT_DELAY_MS="5,20")
    args = ["--url", url, "run", "tests.agents_for_tests:recorder", "--processes", "2"]
    args += ["--metrics-port", str(port), "--metrics-host", "127.0.0.1"]
    parent = CliProcess(args, env=env, log_dir=tmp_path)
    seen: set[int] = set()  # every child pid, to check (and, on failure, kill) them all

    async def consumers() -> int:
        rows = await asyncio.to_thread(broker_admin.list_queues, fresh_vhost)
        return rows[queue].consumers if queue in rows else 0

    async def ready() -> bool:
        parent.running()
        response = await get(port, "/readyz", timeout_s=5)
        return response is not None and response.status == 200

    async def two_children_ready() -> list[int]:
        pids = children_of(parent.proc.pid)
        seen.update(pids)
        return pids if len(pids) == 2 and await ready() and await consumers() == 2 else []

    ids = itertools.count()
    called: set[int] = set()
    answered: set[int] = set()
    failures: list[str] = []
    loading = True

    async def caller(client: RpcClient) -> None:
        while loading:
            request = next(ids)
            called.add(request)
            try:
                reply = await client.call(name, "work", {"id": request}, timeout_s=30)
            except Exception as exc:  # the ledger counts it; the test fails below
                failures.append(f"{request}: {exc!r}")
            else:
                assert reply == {"id": request}
                answered.add(request)

    try:
        first = await wait_until(
            two_children_ready, timeout_s=30, interval_s=0.2, what="2 children consuming"
        )
        client = RpcClient(await connect(url))
        async with client:
            callers = [asyncio.create_task(caller(client)) for _ in range(CALLERS)]
            try:
                # Both children answer: each one's own counter, in the parent's one page.
                await wait_until(
                    lambda: _both(handled_by_process(port, name)),
                    timeout_s=30,
                    interval_s=0.2,
                    what="both processes to handle calls",
                )
                before = len(answered)
                os.kill(first[0], signal.SIGKILL)
                replaced = await wait_until(
                    lambda: _replaced(two_children_ready(), first),
                    timeout_s=30,
                    interval_s=0.2,
                    what="the killed child to be replaced (2 consumers again)",
                )
                # The load goes on through the new child too.
                await wait_until(
                    lambda: len(answered) >= before + 200,
                    timeout_s=30,
                    what="calls to go on after the restart",
                )
            finally:
                loading = False
                await asyncio.wait(callers, timeout=40)
            for task in callers:
                assert task.done()
                task.result()
        assert not failures, failures[:5]
        assert answered == called
        assert called <= set(read_ids(record))  # handled at least once (a redelivery: twice)
        assert first[0] not in replaced
        assert not alive(first[0])
        page = await get(port, "/metrics", timeout_s=5)
        assert page is not None
        restarts = [
            sample.value
            for family in text_string_to_metric_families(page.body.decode())
            for sample in family.samples
            if sample.name == "amqp_agents_process_restarts_total"
        ]
        assert sorted(restarts) == [0.0, 1.0]
        parent.terminate()
        code = await parent.await_exit(40)
    finally:
        for pid in seen | set(children_of(parent.proc.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        parent.close()
    output = parent.output()
    assert code == 0, output
    assert not [pid for pid in seen if alive(pid)]
    assert "SIGTERM: stopping 2 process(es) gracefully" in output
    assert "exited unexpectedly (exit code -9)" in output
    assert "Traceback" not in output


async def _both(counts: Awaitable[dict[str, float]]) -> bool:
    found = await counts
    return found.get("0", 0) > 0 and found.get("1", 0) > 0


async def _replaced(ready: Awaitable[list[int]], first: list[int]) -> list[int]:
    pids = await ready
    return pids if pids and first[0] not in pids else []
