"""The demo runs anywhere: on the in-process broker, with no RabbitMQ."""

from __future__ import annotations

import pytest

from amqp_agents.cli import main


def test_demo_on_memory_exits_zero_with_a_full_transcript(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`amqp-agents demo` shows priority overtaking, replies, errors, events, the
    orchestrator, and a deadline running out half-way with the late request dropped."""
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
    assert "   -> planner.plan_create" in out
    assert '<- ok {"task_ids": [' in out
    assert "   <- TIMEOUT: action 'plan_create' took longer than" in out
    assert "   task_manager created 1 of the 6 tasks; the rest was not done" in out
    assert "   dropped unstarted: worker.stats.expired = 1" in out
    assert "16 requests answered with a reply" in out
    assert "4 notify() requests acked without one" in out
    assert "10 events the audit agent recorded" in out
    assert "1 expired" in out
    assert "every reply was as expected" in out
