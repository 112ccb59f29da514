"""Messages, envelopes and the wire codec: the bottom layer, pure data."""

from amqp_agents.models.envelope import Envelope, HeaderValue
from amqp_agents.models.messages import (
    AgentMessage,
    AgentResponse,
    ErrorCode,
    ErrorInfo,
    Priority,
    new_id,
)

__all__ = [
    "AgentMessage",
    "AgentResponse",
    "Envelope",
    "ErrorCode",
    "ErrorInfo",
    "HeaderValue",
    "Priority",
    "new_id",
]
