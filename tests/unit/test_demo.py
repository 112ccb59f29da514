"""The demo runs anywhere: on the in-process broker, with no RabbitMQ."""

from __future__ import annotations

import pytest

from amqp_agents.cli import main


def test_demo_on_memory_exits_zero_with_a_full_transcript(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`amqp-agents demo` shows priority overtaking, replies, errors and events."""
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "amqp-agents demo on memory://" in out
    listing = [line for line in out.splitlines() if line.strip().startswith("task 1:")]
    assert listing == ["   task 1: HIGH: the server is down"]
    for code in ("NOT_FOUND", "INVALID_PAYLOAD", "UNKNOWN_ACTION", "NO_ROUTE"):
        assert f"<- {code}" in out
    assert "audit: task.completed" in out
    assert "every reply was as expected" in out
