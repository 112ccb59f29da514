"""The demo on the real broker, in a vhost of its own."""

from __future__ import annotations

import pytest

from amqp_agents.cli import main
from amqp_agents.testing import url_for_vhost


def test_demo_on_rabbitmq_exits_zero(
    broker_url: str, fresh_vhost: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`amqp-agents --url amqp://... demo` runs the same transcript on RabbitMQ."""
    assert main(["--url", url_for_vhost(broker_url, fresh_vhost), "demo"]) == 0
    out = capsys.readouterr().out
    assert "amqp-agents demo on amqp://guest:***@" in out
    assert "   1. HIGH: the server is down" in out
    assert "every reply was as expected" in out
