"""A three-node RabbitMQ 4.0 cluster for the tests marked ``cluster``.

They run only when asked for (``scripts/test-rabbitmq4 -m cluster``; see
``pytest_collection_modifyitems`` in ``tests/conftest.py``). The session's
:class:`Cluster` brings the nodes of ``scripts/rabbitmq4 cluster`` up if they are not
(about 20 s, 30 s the first time) and stops them at the end if it started them. A node
that cannot be started fails the test; it is never skipped.

A test that stops a node starts it again, whatever happens, with :meth:`Cluster.stopped`
(or :meth:`Cluster.astopped` in a test whose event loop must keep running, and
:meth:`Cluster.adown` to choose between a graceful stop and a SIGKILL)::

    async with cluster.astopped(leader):
        ...  # the two other nodes serve
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import pytest

from amqp_agents.testing import url_for_vhost
from tests.broker_env import ROOT

RABBITMQ4 = ROOT / "scripts" / "rabbitmq4"
# Bounds of one scripts/rabbitmq4 call: a cluster (re)started from scratch, one node, a CLI call.
UP_TIMEOUT_S = 300.0
NODE_TIMEOUT_S = 150.0
CTL_TIMEOUT_S = 75.0


def rabbitmq4(*args: str, timeout_s: float) -> str:
    """Run ``scripts/rabbitmq4 ARGS``; its stdout, or an AssertionError with its output."""
    try:
        done = subprocess.run(  # our own script, our own arguments
            [str(RABBITMQ4), *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"scripts/rabbitmq4 {' '.join(args)}: no end in {timeout_s:g} s"
        ) from exc
    if done.returncode != 0:
        raise AssertionError(
            f"scripts/rabbitmq4 {' '.join(args)} failed ({done.returncode}):\n"
            f"{done.stdout}{done.stderr}"
        )
    return done.stdout


@dataclass(frozen=True)
class ClusterNode:
    """One node of the cluster: its Erlang name and AMQP port on 127.0.0.1."""

    name: str
    port: int

    @property
    def url(self) -> str:
        """The node's root URL (default vhost, guest)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def vhost_url(self, vhost: str) -> str:
        """The node's URL for ``vhost``."""
        return url_for_vhost(self.url, vhost)


class Cluster:
    """The three 4.0 nodes: their URLs, their CLI, and stopping and starting one."""

    def __init__(self, nodes: tuple[ClusterNode, ...]) -> None:
        self.nodes = nodes

    def node(self, name: str) -> ClusterNode:
        """The node called ``name`` (``rabbit4a@localhost``)."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node {name} in {[node.name for node in self.nodes]}")

    def others(self, node: ClusterNode) -> list[ClusterNode]:
        """Every node but ``node``."""
        return [other for other in self.nodes if other != node]

    def ctl(self, node: ClusterNode, *args: str) -> str:
        """``rabbitmqctl -n NODE -q ARGS`` (bounded); its stdout."""
        return rabbitmq4("ctl", node.name, "-q", *args, timeout_s=CTL_TIMEOUT_S)

    def stop(self, node: ClusterNode) -> None:
        """Stop ``node`` (returns once it no longer answers)."""
        rabbitmq4("stop", node.name, timeout_s=NODE_TIMEOUT_S)

    def kill(self, node: ClusterNode) -> None:
        """Kill ``node``'s VM (SIGKILL: a crash; no goodbye to clients or peers)."""
        rabbitmq4("kill", node.name, timeout_s=NODE_TIMEOUT_S)

    def start(self, node: ClusterNode) -> None:
        """Start ``node`` again (returns once it has booted and rejoined)."""
        rabbitmq4("start", node.name, timeout_s=NODE_TIMEOUT_S)

    @contextmanager
    def stopped(self, node: ClusterNode) -> Iterator[ClusterNode]:
        """Stop ``node`` for the block; it is started again whatever the block does."""
        self.stop(node)
        try:
            yield node
        finally:
            self.start(node)

    @asynccontextmanager
    async def astopped(self, node: ClusterNode) -> AsyncIterator[ClusterNode]:
        """:meth:`stopped` with the stop and start off the event loop."""
        await asyncio.to_thread(self.stop, node)
        try:
            yield node
        finally:
            await asyncio.to_thread(self.start, node)

    def ctl_any(self, *args: str) -> str:
        """:meth:`ctl` on the first node that answers (one may be stopped)."""
        failures = []
        for node in self.nodes:
            try:
                return self.ctl(node, *args)
            except AssertionError as exc:
                failures.append(str(exc))
        raise AssertionError("no node of the cluster answers:\n" + "\n".join(failures))

    @contextmanager
    def vhost(self) -> Iterator[str]:
        """A vhost of its own for the block (guest may use it); deleted after."""
        name = f"cluster-{uuid.uuid4().hex[:10]}"
        self.ctl_any("add_vhost", name)
        try:
            self.ctl_any("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
            yield name
        finally:
            self.ctl_any("delete_vhost", name)

    @asynccontextmanager
    async def adown(self, node: ClusterNode, *, how: str) -> AsyncIterator[ClusterNode]:
        """:meth:`astopped` (``how="stop"``, a graceful stop) or the same with a
        :meth:`kill` (``how="kill"``); the node is started again whatever happens."""
        if how not in ("stop", "kill"):
            raise ValueError(f"how: 'stop' or 'kill', not {how!r}")
        await asyncio.to_thread(self.kill if how == "kill" else self.stop, node)
        try:
            yield node
        finally:
            await asyncio.to_thread(self.start, node)

    def running_nodes(self, asked: ClusterNode) -> set[str]:
        """The names of the nodes ``asked`` sees running (``cluster_status``)."""
        status = json.loads(self.ctl(asked, "cluster_status", "--formatter", "json"))
        return set(status["running_nodes"])

    def quorum_leader(self, queue: str, *, vhost: str = "/") -> ClusterNode:
        """The node that leads quorum queue ``queue``, as a running node reports it."""
        for asked in self.nodes:
            try:
                out = self.ctl(
                    asked, "list_queues", "-p", vhost, "--no-table-headers", "name", "leader"
                )
            except AssertionError:
                continue  # that node is down: ask the next
            for line in out.splitlines():
                fields = line.split("\t")
                if len(fields) == 2 and fields[0] == queue:
                    return self.node(fields[1])
            raise AssertionError(f"{asked.name} lists no queue {queue!r} in {vhost!r}:\n{out}")
        raise AssertionError("no node of the cluster answers")


@pytest.fixture
def cluster_vhost(cluster: Cluster) -> Iterator[str]:
    """A fresh vhost on the cluster for one test, deleted after it."""
    with cluster.vhost() as name:
        yield name


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The three-node 4.0 cluster, up; stopped at the end if this session started it."""
    listed = rabbitmq4("cluster", "nodes", timeout_s=CTL_TIMEOUT_S)
    nodes = tuple(
        ClusterNode(name, int(port))
        for name, port in (line.split() for line in listed.splitlines())
    )
    try:
        rabbitmq4("setup", timeout_s=UP_TIMEOUT_S)
        status = rabbitmq4("status", timeout_s=CTL_TIMEOUT_S)
        was_up = all(f"{node.name} running" in status for node in nodes)
        rabbitmq4("cluster", "up", timeout_s=UP_TIMEOUT_S)
    except AssertionError as exc:
        pytest.fail(f"the RabbitMQ 4.0 cluster cannot be brought up: {exc}", pytrace=False)
    try:
        yield Cluster(nodes)
    finally:
        if not was_up:
            rabbitmq4("cluster", "down", timeout_s=UP_TIMEOUT_S)
