"""What every command needs around its work: the agents of ``MODULE:ATTR``, a connected
transport closed however the command ends, the stop signals, the tracing the settings
ask for, the event bus, JSON input."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from amqp_agents.errors import ConfigurationError
from amqp_agents.events.bus import DeliveryGuard, EventBus
from amqp_agents.runtime.agent import Agent
from amqp_agents.transport.factory import create_transport

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from amqp_agents.config import Settings
    from amqp_agents.tracing import Tracing
    from amqp_agents.transport.base import Transport

__all__ = [
    "connected",
    "event_bus",
    "exit_when_lost",
    "json_object",
    "load_agents",
    "on_stop_signals",
    "read_payload",
    "tracing_from",
]

log = logging.getLogger("amqp_agents.cli")


@contextlib.asynccontextmanager
async def connected(settings: Settings) -> AsyncIterator[Transport]:
    """A connected transport for one command, closed however the command ends."""
    transport = create_transport(settings.connection)
    await transport.connect()
    try:
        yield transport
    finally:
        await transport.aclose()


def on_stop_signals(callback: Callable[[int], object]) -> None:
    """Call ``callback(signum)`` on SIGTERM and SIGINT (the loop's handlers, not
    ``signal.signal``: they run on the loop, between steps)."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, callback, signum)


def exit_when_lost(transport: Transport, settings: Settings, lost: asyncio.Event) -> None:
    """Set ``lost`` when the connection dies for good: a transport that reconnects by
    itself (the default) comes back, and the command goes on."""
    if not settings.connection.reconnect:
        transport.on_connection_lost(lambda _exc: lost.set())


def read_payload(text: str) -> str:
    """The payload argument's text: ``-`` reads stdin, ``@FILE`` a file, else itself."""
    if text == "-":
        return sys.stdin.read()
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigurationError(f"cannot read the payload file {path}: {reason}") from None
    return text


def json_object(text: str) -> dict[str, Any]:
    text = read_payload(text)
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"the payload is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ConfigurationError("the payload must be a JSON object")
    return payload


def event_bus(
    transport: Transport, settings: Settings, *, guard: DeliveryGuard | None = None
) -> EventBus:
    return EventBus(
        transport,
        topology=settings.topology,
        publish_timeout_s=settings.connection.publish_timeout_s,
        max_message_bytes=settings.connection.max_message_bytes,
        guard=guard,
        tracing=tracing_from(settings),
    )


def tracing_from(settings: Settings) -> Tracing | None:
    """The spans' maker when tracing is enabled (imported only then: it is optional)."""
    if not settings.tracing.enabled:
        return None
    try:
        from amqp_agents.tracing import Tracing
    except ImportError as exc:
        raise ConfigurationError(str(exc)) from None
    url = urlsplit(settings.url.get_secret_value())
    return Tracing(server_address=url.hostname, server_port=url.port or _default_port(url.scheme))


def _default_port(scheme: str) -> int | None:
    return {"amqp": 5672, "amqps": 5671}.get(scheme)


def load_agents(target: str) -> list[Agent]:
    """Import ``MODULE:ATTR``; ATTR is an agent, an agent class, a list of them, or a
    callable returning one of those."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigurationError(f"expected MODULE:ATTR, got {target!r}")
    # Like ``python -m``: modules of the current directory are importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r}: {exc}") from None
    try:
        value: Any = getattr(module, attr)
    except AttributeError:
        raise ConfigurationError(f"module {module_name!r} has no attribute {attr!r}") from None
    if callable(value) and not isinstance(value, type | Agent):
        value = value()
    items = value if isinstance(value, list | tuple) else [value]
    agents: list[Agent] = []
    for item in items:
        if isinstance(item, type) and issubclass(item, Agent):
            item = item()
        if not isinstance(item, Agent):
            raise ConfigurationError(f"{target} gave {item!r}, which is not an Agent")
        agents.append(item)
    if not agents:
        raise ConfigurationError(f"{target} names no agents")
    return agents
