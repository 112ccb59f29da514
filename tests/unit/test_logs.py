"""Log formats: JSON lines with structured fields, and passwords always redacted."""

from __future__ import annotations

import json
import logging

from amqp_agents.logs import JsonFormatter, RedactingFormatter


def _record(message: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("amqp_agents.test", logging.WARNING, __file__, 1, message, (), None)
    record.__dict__.update(extra)
    return record


def test_json_lines_carry_the_structured_fields() -> None:
    """agent, action, correlation_id and outcome become keys; unset ones are left out."""
    line = JsonFormatter().format(
        _record("dead-lettered", agent="tasks", action="task_add", correlation_id="c1", outcome="x")
    )
    data = json.loads(line)
    assert data["level"] == "WARNING"
    assert data["message"] == "dead-lettered"
    assert (data["agent"], data["action"], data["correlation_id"], data["outcome"]) == (
        "tasks",
        "task_add",
        "c1",
        "x",
    )
    assert "queue" not in data


def test_passwords_in_urls_are_redacted_in_both_formats() -> None:
    """A broker URL with a password in any message shows *** instead."""
    message = "connecting to amqp://app:hunter2@rabbit:5672/prod and amqps://u:p4ss@h/"
    for formatter in (JsonFormatter(), RedactingFormatter("%(message)s")):
        text = formatter.format(_record(message))
        assert "hunter2" not in text
        assert "p4ss" not in text
        assert "amqp://app:***@rabbit:5672/prod" in text
