"""The in-process message models: requests, replies, error info and priorities."""

import pytest
from pydantic import ValidationError

from amqp_agents.models.messages import (
    AgentMessage,
    AgentResponse,
    ErrorCode,
    ErrorInfo,
    Priority,
    new_id,
)
from amqp_agents.models.topology import MAX_PRIORITY


def test_success_carries_data_and_no_error() -> None:
    """success() builds an ok reply whose data, code and correlation id are as given."""
    reply = AgentResponse.success({"n": 1}, correlation_id="c-1")

    assert reply.ok is True
    assert reply.data == {"n": 1}
    assert reply.error is None
    assert reply.code is None
    assert reply.correlation_id == "c-1"


def test_failure_carries_error_info() -> None:
    """failure() builds a not-ok reply whose error holds code, message and details."""
    reply = AgentResponse.failure(
        ErrorCode.NOT_FOUND, "no such task", details={"id": 3}, correlation_id="c-2"
    )

    assert reply.ok is False
    assert reply.data is None
    assert reply.error == ErrorInfo(code="NOT_FOUND", message="no such task", details={"id": 3})
    assert reply.code == "NOT_FOUND"
    assert type(reply.code) is str
    assert reply.correlation_id == "c-2"


def test_ok_reply_with_error_is_rejected() -> None:
    """An ok reply that also carries an error fails validation."""
    with pytest.raises(ValidationError, match="successful reply carries no error"):
        AgentResponse(ok=True, error=ErrorInfo(code="X", message="m"))


def test_failed_reply_without_error_is_rejected() -> None:
    """A not-ok reply without an error object fails validation."""
    with pytest.raises(ValidationError, match="must carry an error object"):
        AgentResponse.model_validate({"ok": False, "data": 1})


def test_valid_replies_pass_validation() -> None:
    """Both legal shapes validate from plain data."""
    assert AgentResponse.model_validate({"ok": True, "data": [1]}).data == [1]
    failed = AgentResponse.model_validate({"ok": False, "error": {"code": "X", "message": "m"}})
    assert failed.code == "X"


def test_error_info_accepts_unknown_codes_and_ignores_extra_fields() -> None:
    """A service's own code is kept verbatim; unknown fields are ignored, not rejected."""
    info = ErrorInfo.model_validate({"code": "QUOTA_EXCEEDED", "message": "m", "retry": 3})

    assert info.code == "QUOTA_EXCEEDED"
    assert info.details is None
    assert not hasattr(info, "retry")


def test_priority_values_are_the_contract() -> None:
    """Priority members keep their documented AMQP values, all within 0..MAX_PRIORITY."""
    assert {p.name: int(p) for p in Priority} == {
        "LOWEST": 0,
        "LOW": 2,
        "NORMAL": 4,
        "HIGH": 7,
        "CRITICAL": 9,
    }
    assert max(Priority) == MAX_PRIORITY


def test_error_code_values_equal_their_names() -> None:
    """Every ErrorCode's wire value is its own name (codes are never renamed)."""
    assert all(code.value == code.name for code in ErrorCode)


def test_agent_message_defaults() -> None:
    """A minimal request gets a fresh hex id, an empty payload and NORMAL priority."""
    first = AgentMessage(action="task_add")
    second = AgentMessage(action="task_add")

    assert first.payload == {}
    assert first.priority == Priority.NORMAL
    assert len(first.id) == 32
    int(first.id, 16)
    assert first.id != second.id
    assert first.created_at.tzinfo is not None


def test_new_id_is_unique_hex() -> None:
    """new_id() returns distinct 32-character hex strings."""
    ids = {new_id() for _ in range(100)}

    assert len(ids) == 100
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


@pytest.mark.parametrize("action", ["", "x" * 256])
def test_agent_message_rejects_bad_action_length(action: str) -> None:
    """An empty or over-long action fails validation on the 'action' field."""
    with pytest.raises(ValidationError) as caught:
        AgentMessage(action=action)
    assert caught.value.errors()[0]["loc"] == ("action",)


def test_agent_message_forbids_extra_fields() -> None:
    """Unknown fields in a request are rejected, since we own the schema."""
    with pytest.raises(ValidationError) as caught:
        AgentMessage.model_validate({"action": "a", "colour": "red"})
    assert caught.value.errors()[0]["type"] == "extra_forbidden"


def test_agent_message_is_frozen() -> None:
    """A request cannot be mutated after construction."""
    message = AgentMessage(action="a")
    with pytest.raises(ValidationError):
        message.action = "b"  # type: ignore[misc]
