"""Shared fixtures: the real broker, throw-away vhosts, connected transports.

The broker is never optional: if it cannot be reached, every test that needs it
*fails* (it is not skipped), so CI cannot go green without integration tests.
``AMQP_AGENTS_TEST_URL`` points the suite at another broker and
``AMQP_AGENTS_TEST_RABBITMQCTL`` at its CLI (see :mod:`tests.broker_env`); with
``AMQP_AGENTS_TESTCONTAINERS=1`` a RabbitMQ container is started instead (needs Docker).
Redis (the example app's shared task store) is never optional either:
``AMQP_AGENTS_TEST_REDIS_URL``, else ``redis://127.0.0.1:6379/0``; each test uses keys
under a prefix of its own and deletes them after.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from urllib.parse import urlsplit

import pytest
from redis.asyncio import Redis

from amqp_agents.config import ConnectionSettings
from amqp_agents.testing import BrokerAdmin, broker_reachable, url_for_vhost
from amqp_agents.transport.rabbitmq import RabbitTransport
from tests.broker_env import rabbitmqctl_command, root_url

# Our own users' plugin: the suite uses it, which also keeps it working.
pytest_plugins = ["amqp_agents.testing.pytest_plugin"]

DEFAULT_TEST_REDIS_URL = "redis://127.0.0.1:6379/0"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cluster`` run only when ``-m`` names them (``-m cluster``): they need
    the three-node cluster of ``scripts/rabbitmq4``, which the plain suite does not start."""
    if "cluster" in (config.getoption("markexpr") or ""):
        return
    deselected = [item for item in items if item.get_closest_marker("cluster") is not None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item.get_closest_marker("cluster") is None]


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    """The root URL of the broker under test (default vhost)."""
    if os.environ.get("AMQP_AGENTS_TESTCONTAINERS") == "1":  # pragma: no cover - needs Docker
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3.10-management") as container:
            params = container.get_connection_params()
            yield f"amqp://guest:guest@{params.host}:{params.port}/"
        return
    url = root_url()
    if not broker_reachable(url):
        pytest.fail(
            f"RabbitMQ is not reachable at {url.split('@')[-1]}: start it with "
            "`rabbitmq-server -detached` (integration tests are never skipped)",
            pytrace=False,
        )
    yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis the example app's store tests use; unreachable fails the test."""
    url = os.environ.get("AMQP_AGENTS_TEST_REDIS_URL", DEFAULT_TEST_REDIS_URL)
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), 2):
            pass
    except OSError:
        pytest.fail(
            f"Redis is not reachable at {parts.hostname}:{parts.port}: start it with"
            " scripts/services (tests that need it are never skipped)",
            pytrace=False,
        )
    return url


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix of this test's own; its keys are deleted after the test."""
    prefix = f"test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def broker_admin(broker_url: str, tmp_path_factory: pytest.TempPathFactory) -> BrokerAdmin:
    """rabbitmqctl for the broker under test (``AMQP_AGENTS_TEST_RABBITMQCTL``)."""
    try:
        command = rabbitmqctl_command()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)
    if len(command) == 1:
        return BrokerAdmin(command[0])
    # BrokerAdmin runs one program: a command line with arguments (such as
    # `scripts/rabbitmq4 ctl NODE`) gets a one-line script of this session.
    script = tmp_path_factory.mktemp("rabbitmqctl") / "rabbitmqctl"
    script.write_text(f'#!/bin/sh\nexec {shlex.join(command)} "$@"\n')
    script.chmod(0o755)
    return BrokerAdmin(str(script))


@pytest.fixture(scope="module")
def module_vhost(broker_admin: BrokerAdmin) -> Iterator[str]:
    """A vhost shared by one test module (combine with :func:`unique` names)."""
    vhost = broker_admin.create_vhost()
    try:
        yield vhost
    finally:
        broker_admin.delete_vhost(vhost)


@pytest.fixture
def fresh_vhost(broker_admin: BrokerAdmin) -> Iterator[str]:
    """A vhost of this test's own (slower: two rabbitmqctl calls)."""
    vhost = broker_admin.create_vhost()
    try:
        yield vhost
    finally:
        broker_admin.delete_vhost(vhost)


@pytest.fixture
def amqp_url(broker_url: str, module_vhost: str) -> str:
    """URL of the module's vhost."""
    return url_for_vhost(broker_url, module_vhost)


@pytest.fixture
def unique() -> Callable[[str], str]:
    """``unique("agent")`` -> ``agent-<random>``: names no other test uses."""
    return lambda prefix: f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def connect(amqp_url: str) -> AsyncIterator[Callable[..., Awaitable[RabbitTransport]]]:
    """``await connect()`` -> a connected transport on the module vhost, closed after."""
    opened: list[RabbitTransport] = []

    async def open_transport(url: str | None = None, **overrides: object) -> RabbitTransport:
        settings = ConnectionSettings.model_validate({"url": url or amqp_url, **overrides})
        transport = RabbitTransport(settings)
        await transport.connect()
        opened.append(transport)
        return transport

    yield open_transport
    for transport in opened:
        await transport.aclose()


@pytest.fixture(autouse=True)
async def _no_leftover_tasks() -> AsyncIterator[None]:
    """Cancel tasks a test left running, so one test's leak can't hang the next."""
    yield
    current = asyncio.current_task()
    leftovers = [task for task in asyncio.all_tasks() if task is not current and not task.done()]
    for task in leftovers:
        task.cancel()
    if leftovers:
        await asyncio.wait(leftovers, timeout=5)
