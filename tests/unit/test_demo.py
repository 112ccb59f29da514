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
    listing = [line for line in out.splitlines() if line.startswith("   1. ")]
    assert listing == ["   1. HIGH: the server is down"]
    for code in ("NOT_FOUND", "INVALID_PAYLOAD", "UNKNOWN_ACTION", "NO_ROUTE"):
        assert f"<- {code}" in out
    # INVALID_PAYLOAD comes with its field errors, as the README promises.
    assert "      field title: String should have at least 1 character" in out
    assert "audit: task.completed" in out
    # The worker's counters are explained, not dumped as a repr.
    assert "WorkerStats(" not in out
    assert "9 requests answered with a reply" in out
    assert "4 notify() requests acked without one" in out
    assert "6 events the audit agent recorded" in out
    assert "every reply was as expected" in out
