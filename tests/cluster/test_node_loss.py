"""A node of the three-node cluster stops under steady load: what callers and workers get.

Quorum agent queues (replicated): the node that leads the agent queue stops while a
worker on a second node serves it and a client on the third calls it. **0 lost, 0
hung**: every call ends ok, or ``TIMEOUT`` if it was in flight while the queue had no
leader (its deadline passed during the election); every request the broker confirmed
is handled; the broker counts one consumer on the queue after; the first call made
after the stop is answered within 5 s.

Classic agent queues (one replica, on the node that declared them): the queue is
unavailable while its node is down. The worker is told (``basic.cancel``), says why in
its readiness (``/readyz`` 503 with the reason), keeps trying to re-attach with backoff
(no hot loop), does not crash, and serves everything once the node is back.

The figures are printed (``-s``) and quoted in ``docs/protocol.md``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from typing import TYPE_CHECKING

import pytest

from amqp_agents.config import ConnectionSettings
from amqp_agents.errors import AmqpAgentsError
from amqp_agents.models.topology import QueueType, Topology
from amqp_agents.transport.base import ExchangeKind
from amqp_agents.transport.rabbitmq import RabbitTransport
from tests.cluster.load import (
    CALL_TIMEOUT_S,
    Rig,
    account,
    serving,
    timeouts_in_the_fault,
    under_load,
)
from tests.support import wait_until

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from tests.cluster.conftest import Cluster, ClusterNode

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

QUORUM = Topology(queue_type=QueueType.QUORUM)
CLASSIC = Topology()
BASELINE_S = 3.0
"""Load before the fault: a duration, not a synchronisation."""
DOWN_S = 8.0
"""How long the node stays down once calls flow again (quorum)."""
CLASSIC_DOWN_S = 12.0
"""A classic queue's outage: past the first re-attach try after a kill (which waits
out its 10 s declare timeout), within the worker's 30 s re-attach limit."""
FIRST_REPLY_WITHIN_S = 5.0
REATTACH_LIMIT_S = 4.0


async def declare_agent_queue(url: str, topology: Topology, agent: str) -> None:
    """Declare the agent's queue through ``url`` before any worker: a quorum queue's
    first leader and a classic queue's only replica are on the declaring node."""
    async with RabbitTransport(ConnectionSettings(url=url, reconnect=False)) as transport:
        await transport.declare_queue(topology.agent_queue_spec(agent))


def spread(
    cluster: Cluster,
    vhost: str,
    away_from: ClusterNode,
    *,
    name: str,
    topology: Topology,
    reattach_limit_s: float = 30.0,
) -> AbstractAsyncContextManager[Rig]:
    """:func:`serving` with the worker and the client on the two nodes other than
    ``away_from`` (the node the test stops), one each."""
    worker_node, client_node = cluster.others(away_from)
    return serving(
        worker_node.vhost_url(vhost),
        client_node.vhost_url(vhost),
        name=name,
        topology=topology,
        inspect_urls=[n.vhost_url(vhost) for n in (worker_node, client_node, away_from)],
        reattach_limit_s=reattach_limit_s,
    )


def consumers_by_node(
    cluster: Cluster, asked: ClusterNode, vhost: str, queue: str
) -> dict[str, int]:
    """How many consumers of ``queue`` each node's channels hold, as ``asked`` lists them."""
    out = cluster.ctl(
        asked, "list_consumers", "-p", vhost, "--no-table-headers", "queue_name", "channel_pid"
    )
    counts: dict[str, int] = {}
    for line in out.splitlines():
        name, _, pid = line.partition("\t")
        if name == queue:
            node = pid.strip("<>").split(".")[0]
            counts[node] = counts.get(node, 0) + 1
    return counts


def queue_node(cluster: Cluster, vhost: str, queue: str) -> ClusterNode:
    """The node a classic queue lives on (its process's node)."""
    out = cluster.ctl_any("list_queues", "-p", vhost, "--no-table-headers", "name", "pid")
    for line in out.splitlines():
        name, _, pid = line.partition("\t")
        if name == queue:
            return cluster.node(pid.strip("<>").split(".")[0])
    raise AssertionError(f"no queue {queue!r} in {vhost!r}:\n{out}")


def assert_nothing_lost(rig: Rig, stats: dict[str, object]) -> None:
    ledger = rig.ledger
    assert ledger.hung == 0, stats
    lost = ledger.confirmed - set(rig.agent.handled)
    assert not lost, f"confirmed, never handled: {sorted(lost)[:10]} {stats}"
    twice = {n for n, count in rig.agent.handled.items() if count > 1}
    unexplained = twice - rig.redelivered() - ledger.unknown
    # An idempotent call re-sent after a lost reply may be handled twice: not here, as
    # the client's connection is never lost; so every duplicate must be a redelivery.
    assert not unexplained, f"handled twice, never redelivered: {sorted(unexplained)[:10]}"


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_quorum_queue_leader_lost_under_load(
    cluster: Cluster, cluster_vhost: str, how: str
) -> None:
    """The node leading the agent's quorum queue stops (gracefully, or SIGKILL); the
    worker (another node) and the client (the third) keep going: 0 lost, 0 hung, first
    reply after the loss within 5 s."""
    stats = await quorum_node_loss(cluster, cluster_vhost, how=how, lose="leader")
    assert stats["worker connections"] == 1, "the worker's own node never stopped"


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_quorum_queue_the_workers_node_lost_under_load(
    cluster: Cluster, cluster_vhost: str, how: str
) -> None:
    """The node the worker is connected to stops (its URL first of the three): the
    worker's transport fails over to the next node and re-attaches in place; the
    requests it held unacked are redelivered and handled; 0 lost, 0 hung, first reply
    after the loss within 5 s."""
    stats = await quorum_node_loss(cluster, cluster_vhost, how=how, lose="worker")
    assert stats["worker connections"] == 1, "failed over in place, no supervisor restart"


async def quorum_node_loss(
    cluster: Cluster, vhost: str, *, how: str, lose: str
) -> dict[str, object]:
    """Load, lose a node (``lose``: the queue's ``leader``, or the ``worker``'s node,
    which is not the leader), keep the load while it is down, start it, drain, assert
    nothing lost or hung; the figures."""
    name = f"qq-{uuid.uuid4().hex[:8]}"
    await declare_agent_queue(cluster.nodes[0].vhost_url(vhost), QUORUM, name)
    queue = QUORUM.agent_queue(name)
    leader = await asyncio.to_thread(cluster.quorum_leader, queue, vhost=vhost)
    worker_node, client_node = cluster.others(leader)
    lost = leader if lose == "leader" else worker_node
    # The worker knows every node, its own first (failover goes down the list).
    worker_url = ",".join(n.vhost_url(vhost) for n in (worker_node, client_node, leader))
    async with serving(
        worker_url,
        client_node.vhost_url(vhost),
        name=name,
        topology=QUORUM,
        inspect_urls=[client_node.vhost_url(vhost), worker_node.vhost_url(vhost)],
    ) as rig:
        ledger = rig.ledger
        async with under_load(rig):
            await asyncio.sleep(BASELINE_S)
            began = time.monotonic()
            async with cluster.adown(lost, how=how):
                stopped = time.monotonic()

                def answered_after_the_stop() -> float:
                    return ledger.first_ok_after(stopped) or 0.0

                recovered = await wait_until(
                    answered_after_the_stop,
                    timeout_s=30,
                    interval_s=0.05,
                    what=lambda: f"a call answered after the stop ({ledger.outcomes()})",
                )
                new_leader = await asyncio.to_thread(cluster.quorum_leader, queue, vhost=vhost)
                await asyncio.sleep(DOWN_S)  # load while the node is down: a duration
                consumers_while_down = (await rig.queue_info()).consumers
                consumer_nodes = await asyncio.to_thread(
                    consumers_by_node, cluster, client_node, vhost, queue
                )
                worker_on = rig.taps[-1].connected_to
            await asyncio.sleep(2.0)  # load with the node back
        stats = await account(
            rig,
            fault_began=began,
            **{
                "lost node": f"{lost.name} ({lose})",
                "leader after": new_leader.name,
                "worker connected to while down": worker_on,
                "stop took s": round(stopped - began, 2),
                "first reply after the stop returned s": round(recovered - stopped, 2),
                "consumers while down": consumers_while_down,
                "their channels' nodes": consumer_nodes,
            },
        )
    print(f"\nquorum, {lose}'s node {how}: {stats}")
    assert_nothing_lost(rig, stats)
    assert set(ledger.outcomes()) <= {"ok", "TIMEOUT"}, stats
    late = timeouts_in_the_fault(ledger, recovered=recovered)
    assert not late, f"calls failed after calls flowed again: {late[:5]} {stats}"
    for call in ledger.calls:
        if call.outcome == "TIMEOUT":  # only at the deadline, during the fault
            assert call.ended - call.started >= CALL_TIMEOUT_S - 0.1, (call, stats)
            assert call.started < recovered, (call, stats)
    assert (new_leader != leader) == (lose == "leader"), stats
    # One consumer on the running nodes: the worker's. (After a SIGKILL of the worker's
    # node the broker also counts the dead node's consumer, suspected down, until that
    # node is back: the passive declare says 2 meanwhile.)
    live = {node: n for node, n in consumer_nodes.items() if node != lost.name}
    assert sum(live.values()) == 1, stats
    assert consumers_while_down == 1 + consumer_nodes.get(lost.name, 0), stats
    assert worker_on is not None, stats
    assert f":{lost.port}/" not in worker_on, stats
    assert recovered - stopped < FIRST_REPLY_WITHIN_S, stats
    return stats


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_classic_queue_node_lost_under_load(
    cluster: Cluster, cluster_vhost: str, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """The node holding the agent's classic queue stops: the queue is unavailable, the
    worker (another node) says why in readiness, re-attaches with backoff, does not
    crash; everything confirmed is served once the node is back."""
    caplog.set_level(logging.WARNING, logger="amqp_agents")
    name = f"cq-{uuid.uuid4().hex[:8]}"
    home = cluster.nodes[0]
    await declare_agent_queue(home.vhost_url(cluster_vhost), CLASSIC, name)
    queue = CLASSIC.agent_queue(name)
    assert await asyncio.to_thread(queue_node, cluster, cluster_vhost, queue) == home
    async with spread(cluster, cluster_vhost, home, name=name, topology=CLASSIC) as rig:
        ledger, supervisor = rig.ledger, rig.supervisor
        async with under_load(rig):
            await asyncio.sleep(BASELINE_S)
            began = time.monotonic()
            async with cluster.adown(home, how=how):
                stopped = time.monotonic()
                reason = await wait_until(
                    lambda: supervisor.not_ready_reason() or "",
                    timeout_s=10,
                    what="readiness to fail while the queue's node is down",
                )
                await asyncio.sleep(CLASSIC_DOWN_S)  # the outage: a duration
                still = supervisor.not_ready_reason()
            restarted = time.monotonic()
            attempts = _reattach_attempts(caplog, queue)  # the outage's, start included

            def ready() -> bool:
                return supervisor.is_ready

            await wait_until(ready, timeout_s=30, interval_s=0.1, what="the worker ready again")
            back = time.monotonic()
            recovered = await wait_until(
                lambda: ledger.first_ok_after(restarted) or 0.0,
                timeout_s=30,
                interval_s=0.05,
                what="a call answered after the node came back",
            )
            await asyncio.sleep(2.0)  # load with the node back
        stats = await account(
            rig,
            fault_began=began,
            **{
                "stopped node (the queue's)": home.name,
                "stop took s": round(stopped - began, 2),
                "down s": round(restarted - stopped, 2),
                "outcomes of calls made while down": dict(
                    Counter(c.outcome for c in ledger.calls if stopped <= c.started < restarted)
                ),
                "readiness while down": reason,
                "re-attach tries failed": attempts,
                "ready again after the start returned s": round(back - restarted, 2),
                "first reply after the start returned s": round(recovered - restarted, 2),
            },
        )
        print(f"\nclassic, its node {how}: {stats}")
        assert_nothing_lost(rig, stats)
        assert queue in reason, reason
        assert still is not None, "readiness must fail for the whole outage"
        assert queue in still, still
        # Backoff (0.1 s doubling to 5 s, full jitter): a handful of tries, not a loop.
        assert 1 <= attempts <= 25, stats
        assert rig.worker_connections() == 1, "the worker healed in place, no restart"
        # Calls made while down fail at once and clearly: the broker refuses (nacks)
        # a publish routed to a queue whose node is down, so they end REJECTED.
        assert set(ledger.outcomes()) <= {"ok", "REJECTED"}, stats
        late = timeouts_in_the_fault(ledger, recovered=recovered)
        assert not late, f"calls failed after calls flowed again: {late[:5]} {stats}"
        assert recovered - restarted < FIRST_REPLY_WITHIN_S, stats


async def test_classic_queue_node_down_past_the_reattach_limit(
    cluster: Cluster, cluster_vhost: str
) -> None:
    """The classic queue's node stays down longer than the worker's re-attach limit: the
    supervisor starts the worker over on a new connection (liveness would fail meanwhile)
    and keeps trying with backoff while the queue cannot be declared; it never crashes,
    and serves again once the node is back."""
    name = f"cq-{uuid.uuid4().hex[:8]}"
    home = cluster.nodes[0]
    await declare_agent_queue(home.vhost_url(cluster_vhost), CLASSIC, name)
    async with spread(
        cluster, cluster_vhost, home, name=name, topology=CLASSIC, reattach_limit_s=REATTACH_LIMIT_S
    ) as rig:
        supervisor = rig.supervisor
        assert (await rig.client.send(name, "work", {"id": 1}, timeout_s=5)).ok
        async with cluster.adown(home, how="stop"):

            def started_over() -> bool:
                return rig.worker_connections() >= 2 or rig.supervising.done()

            await wait_until(
                started_over,
                timeout_s=REATTACH_LIMIT_S + 15,
                interval_s=0.1,
                what="the supervisor starting the worker over",
            )
            await asyncio.sleep(REATTACH_LIMIT_S)  # still down: a duration
            crashed = rig.supervising.done()
            reason = supervisor.not_ready_reason()
            connections_while_down = rig.worker_connections()
        assert not crashed, f"the supervisor ended while the node was down: {rig.supervising!r}"

        def ready() -> bool:
            return supervisor.is_ready or rig.supervising.done()

        await wait_until(ready, timeout_s=30, interval_s=0.1, what="the worker ready again")
        assert not rig.supervising.done(), rig.supervising
        assert (await rig.client.send(name, "work", {"id": 2}, timeout_s=5)).ok
        print(
            f"\nclassic, node down past the re-attach limit ({REATTACH_LIMIT_S:g} s):"
            f" worker connections while down {connections_while_down}, readiness {reason!r}"
        )
        assert reason is not None
        # Without backoff (a fixed 0.05 s mean pause) it would be about 80 in this window.
        assert connections_while_down <= 20, "the supervisor backs off between starts"


async def test_a_declare_that_timed_out_does_not_break_the_next(
    cluster: Cluster, cluster_vhost: str
) -> None:
    """A killed node's classic queue makes a declare time out; the next declare, of an
    exchange on the surviving nodes, must work."""
    name = f"cq-{uuid.uuid4().hex[:8]}"
    home, other = cluster.nodes[0], cluster.nodes[1]
    await declare_agent_queue(home.vhost_url(cluster_vhost), CLASSIC, name)
    settings = ConnectionSettings(url=other.vhost_url(cluster_vhost), reconnect=False)
    async with RabbitTransport(settings) as transport:
        async with cluster.adown(home, how="kill"):
            with pytest.raises(AmqpAgentsError) as failed:
                await transport.declare_queue(CLASSIC.agent_queue_spec(name))
            print(f"\ndeclaring the queue of the killed node: {failed.value!r}")
            await transport.declare_exchange(f"x-{name}", ExchangeKind.DIRECT)


def _reattach_attempts(caplog: pytest.LogCaptureFixture, queue: str) -> int:
    """Failed re-attach tries of ``queue``'s consumer logged so far."""
    return sum(
        1
        for record in caplog.records
        if record.name == "amqp_agents.transport.recovery"
        and "re-attaching a consumer to" in record.getMessage()
        and queue in record.getMessage()
    )
