"""Tracing is optional: without a Tracing nothing imports OpenTelemetry or wraps anything."""

from __future__ import annotations

import subprocess
import sys

from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.agent import Agent, action
from amqp_agents.runtime.worker import Worker
from amqp_agents.tracing import Tracing
from amqp_agents.transport.memory import InMemoryBroker, InMemoryTransport


def test_the_library_and_cli_import_no_opentelemetry() -> None:
    """Importing every layer (and building a client) leaves OpenTelemetry unimported."""
    code = (
        "import sys\n"
        "import amqp_agents, amqp_agents.cli\n"
        "from amqp_agents.rpc.client import RpcClient\n"
        "from amqp_agents.transport.memory import InMemoryTransport\n"
        "RpcClient(InMemoryTransport())\n"
        "names = ('opentelemetry', 'amqp_agents.tracing')\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(names))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_without_tracing_the_transport_is_used_as_given() -> None:
    transport = InMemoryTransport(InMemoryBroker())

    assert RpcClient(transport)._transport is transport


def test_tracing_wraps_once() -> None:
    """A worker hands its traced transport to its event bus: not traced twice."""

    class Echo(Agent):
        @action("echo")
        async def echo(self) -> None:
            return None

    tracing = Tracing()
    transport = InMemoryTransport(InMemoryBroker())
    traced = tracing.wrap(transport)
    worker = Worker(transport, [Echo(name="echo")], tracing=tracing)

    assert traced is not transport
    assert tracing.wrap(traced) is traced
    assert Tracing().wrap(traced) is not traced  # another service's tracing: its own spans
    assert worker.events._transport is worker._transport
