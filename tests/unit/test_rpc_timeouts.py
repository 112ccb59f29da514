"""Call timeouts the broker could not honour are refused before anything is sent."""

import math

import pytest

from amqp_agents.config import MAX_TIMEOUT_S, RpcSettings
from amqp_agents.errors import ConfigurationError
from amqp_agents.rpc.client import RpcClient
from amqp_agents.transport.memory import InMemoryBroker, InMemoryTransport


@pytest.mark.parametrize("timeout_s", [math.inf, 1e10, MAX_TIMEOUT_S * 1.01, math.nan, 0, -1])
async def test_unusable_timeouts_raise_configuration_error(timeout_s: float) -> None:
    """inf, NaN and anything past a day raise ConfigurationError (no OverflowError)."""
    transport = InMemoryTransport(InMemoryBroker())
    await transport.connect()
    try:
        async with RpcClient(transport) as client:
            with pytest.raises(ConfigurationError, match="timeout_s must be"):
                await client.send("agent", "action", {}, timeout_s=timeout_s)
    finally:
        await transport.aclose()


async def test_the_largest_timeout_is_accepted() -> None:
    """Exactly one day is allowed: the call is sent (nobody serves it: NO_ROUTE)."""
    transport = InMemoryTransport(InMemoryBroker())
    await transport.connect()
    try:
        async with RpcClient(transport) as client:
            reply = await client.send("agent", "action", {}, timeout_s=MAX_TIMEOUT_S)
    finally:
        await transport.aclose()
    assert reply.code == "NO_ROUTE"


def test_default_timeout_setting_is_bounded_too() -> None:
    """AMQP_AGENTS_RPC__TIMEOUT_S cannot exceed the same bound."""
    with pytest.raises(ValueError, match="less than or equal to 86400"):
        RpcSettings(timeout_s=math.inf)
