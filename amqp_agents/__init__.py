"""amqp-agents: agents that answer RPC requests over RabbitMQ, on a plain-AMQP contract.

The public API is what this module exports; everything else may change.
"""

from amqp_agents.bounds import gather_limited
from amqp_agents.config import (
    ConnectionSettings,
    RetryPolicy,
    RpcSettings,
    Settings,
    WorkerSettings,
)
from amqp_agents.errors import (
    AccessRefusedError,
    ActionTimeoutError,
    AgentError,
    AmqpAgentsError,
    BrokerUnavailableError,
    ConfigurationError,
    ConnectionLostError,
    InternalError,
    InvalidPayloadError,
    LifecycleError,
    MessageTooLargeError,
    NoRouteError,
    NotFoundError,
    PublishRejectedError,
    PublishTimeoutError,
    QueueNotFoundError,
    RejectedError,
    ResourceLockedError,
    Retry,
    RetryableError,
    ShuttingDownError,
    TopologyMismatchError,
    TransportError,
    UnknownActionError,
    UnroutableError,
)
from amqp_agents.events.bus import EventBus, Subscription
from amqp_agents.events.publisher import EventPublisher, RecordingPublisher
from amqp_agents.metrics import Metrics
from amqp_agents.models.context import MessageContext, current_context
from amqp_agents.models.messages import (
    AgentMessage,
    AgentResponse,
    ErrorCode,
    ErrorInfo,
    Event,
    Priority,
)
from amqp_agents.models.topology import Topology
from amqp_agents.rpc.client import Request, RpcClient
from amqp_agents.runtime.agent import Agent, action, on_event
from amqp_agents.runtime.worker import Worker
from amqp_agents.transport.factory import create_transport
from amqp_agents.transport.memory import InMemoryBroker, InMemoryTransport
from amqp_agents.transport.rabbitmq import RabbitTransport

__version__ = "0.1.0"

__all__ = [
    "AccessRefusedError",
    "ActionTimeoutError",
    "Agent",
    "AgentError",
    "AgentMessage",
    "AgentResponse",
    "AmqpAgentsError",
    "BrokerUnavailableError",
    "ConfigurationError",
    "ConnectionLostError",
    "ConnectionSettings",
    "ErrorCode",
    "ErrorInfo",
    "Event",
    "EventBus",
    "EventPublisher",
    "InMemoryBroker",
    "InMemoryTransport",
    "InternalError",
    "InvalidPayloadError",
    "LifecycleError",
    "MessageContext",
    "MessageTooLargeError",
    "Metrics",
    "NoRouteError",
    "NotFoundError",
    "Priority",
    "PublishRejectedError",
    "PublishTimeoutError",
    "QueueNotFoundError",
    "RabbitTransport",
    "RecordingPublisher",
    "RejectedError",
    "Request",
    "ResourceLockedError",
    "Retry",
    "RetryPolicy",
    "RetryableError",
    "RpcClient",
    "RpcSettings",
    "Settings",
    "ShuttingDownError",
    "Subscription",
    "Topology",
    "TopologyMismatchError",
    "TransportError",
    "UnknownActionError",
    "UnroutableError",
    "Worker",
    "WorkerSettings",
    "action",
    "create_transport",
    "current_context",
    "gather_limited",
    "on_event",
]
