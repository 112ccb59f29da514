"""Every name the wire contract fixes, and every queue's declaration, in one place.

Exchange and queue names, header keys and queue arguments are spelled here and nowhere
else (``docs/protocol.md`` explains them to services in other languages). Callers ask
for a queue by its *kind* (agent queue, retry tier, dead-letter queue, group queue,
private or reply queue) and get a :class:`QueueSpec` whose arguments follow the queue
*type* configured for it, so adding a queue type changes this module only.

What each queue type promises (details in ``docs/protocol.md``):

* ``classic``: one replica, on the node that declared it. Agent queues get
  ``x-max-priority`` (strict priorities 0..max). Lost with its node until it returns.
* ``quorum``: replicated (Raft) across the cluster, survives the loss of a minority of
  nodes. No ``x-max-priority`` (RabbitMQ 3.x refuses it; 4.0-4.2 give two levels, 0-4
  and 5-9, delivered about 2:1; 4.3 has strict levels). The broker's delivery limit
  (20 by default since 4.0) is a backstop behind the worker's own attempt count.
  Retry tiers dead-letter *at least once* (``x-dead-letter-strategy``), which needs
  ``x-overflow=reject-publish``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Final

from pydantic import BaseModel, ConfigDict, Field, field_validator

from amqp_agents.errors import ConfigurationError

if TYPE_CHECKING:
    from amqp_agents.models.envelope import HeaderValue

__all__ = [
    "ACTION_DESCRIBE",
    "HEADER_ATTEMPT",
    "HEADER_CAUSATION_ID",
    "HEADER_DEADLINE",
    "MAX_PRIORITY",
    "RESERVED_ACTIONS",
    "QueueSpec",
    "QueueType",
    "Topology",
    "check_name",
]

HEADER_DEADLINE: Final = "x-deadline"
"""Header: the caller's deadline, integer milliseconds since the Unix epoch."""
HEADER_ATTEMPT: Final = "x-attempt"
"""Header: which delivery attempt this is (1 when absent); set by retries, not x-death."""
HEADER_CAUSATION_ID: Final = "x-causation-id"
"""Header: the ``message_id`` of the message whose handler sent this request or event."""
HEADER_ERROR_CODE: Final = "x-error-code"
"""Dead letters: the error code of the last failure."""
HEADER_ERROR_MESSAGE: Final = "x-error-message"
"""Dead letters: the error message of the last failure."""
HEADER_ORIGINAL_EXCHANGE: Final = "x-original-exchange"
"""Dead letters: the exchange the request was first published to."""
HEADER_ORIGINAL_ROUTING_KEY: Final = "x-original-routing-key"
"""Dead letters: its routing key (the agent)."""
HEADER_DEAD_LETTERED_AT: Final = "x-dead-lettered-at"
"""Dead letters: when, integer milliseconds since the Unix epoch."""
DEAD_LETTER_HEADERS: Final = (
    HEADER_ERROR_CODE,
    HEADER_ERROR_MESSAGE,
    HEADER_ORIGINAL_EXCHANGE,
    HEADER_ORIGINAL_ROUTING_KEY,
    HEADER_DEAD_LETTERED_AT,
)
HEADER_TRACEPARENT: Final = "traceparent"
"""Header (optional): the W3C trace context of the sender's span."""
HEADER_TRACESTATE: Final = "tracestate"
"""Header (optional): vendor trace state travelling with ``traceparent``."""
BROKER_DEATH_HEADERS: Final = ("x-death", "x-first-death-")
"""What RabbitMQ itself adds when it dead-letters (``x-first-death-*`` is a prefix)."""
CONTENT_TYPE_JSON: Final = "application/json"
MAX_PRIORITY: Final = 9
"""Highest priority in the contract; the default ``x-max-priority`` of agent queues."""

ACTION_DESCRIBE: Final = "$describe"
"""The action every agent answers with its actions' schemas (in-band discovery)."""
RESERVED_ACTIONS: Final = frozenset({ACTION_DESCRIBE})
"""Actions the library answers itself. They start with ``$``, outside the grammar of
names, so no action of a conforming agent (in any language) can collide with one."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$")


@functools.lru_cache(maxsize=4096)
def check_name(kind: str, name: str) -> str:
    """Validate an agent/action/group/event name: it becomes a routing key or queue name.

    A reserved action (:data:`RESERVED_ACTIONS`) is a valid action name to *send*;
    ``@action`` refuses to declare one.

    Raises:
        ConfigurationError: (a ``ValueError``) naming the rule.
    """
    if kind == "action" and name in RESERVED_ACTIONS:
        return name
    if not _NAME.fullmatch(name):
        raise ConfigurationError(
            f"invalid {kind} name {name!r}: use 1-200 characters from letters, digits,"
            " '_', '.', '-', starting with a letter or digit"
        )
    return name


class QueueType(StrEnum):
    """How a durable queue is stored: the ``x-queue-type`` argument."""

    CLASSIC = "classic"
    """One replica; strict priorities on agent queues. The default."""
    QUORUM = "quorum"
    """Replicated across the cluster's nodes; survives a node loss."""


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """A queue declaration. ``name=""`` asks the broker for a server-named queue."""

    name: str
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    arguments: dict[str, HeaderValue] = field(default_factory=dict)


class Topology(BaseModel):
    """The names of exchanges and queues and the queue types, configurable as a whole.

    Changing a name or a queue's type changes the wire contract: every service must
    agree on it, and a queue that already exists with another type is refused by the
    broker (``TopologyMismatchError`` naming both).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    requests_exchange: str = Field(default="agents", min_length=1)
    queue_prefix: str = "agents."
    max_priority: int = Field(default=MAX_PRIORITY, ge=1, le=255)
    events_exchange: str = Field(default="events", min_length=1)
    event_queue_prefix: str = "events."
    dead_letter_suffix: str = ".dead"
    dead_letter_exchange_suffix: str = ".dlx"
    queue_type: QueueType = QueueType.CLASSIC
    """The type of every agent, group, retry and dead-letter queue..."""
    queue_types: dict[str, QueueType] = Field(default_factory=dict)
    """...unless overridden here, by agent name (``task_manager``) or by group name
    prefixed with ``events:`` (``events:audit``). The retry tiers and dead-letter queue
    of an agent or group follow its type."""

    @field_validator("requests_exchange", "events_exchange")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value.startswith("amq."):
            raise ValueError("exchange names starting with 'amq.' are reserved by RabbitMQ")
        return value

    # -- names -------------------------------------------------------------------------

    def agent_queue(self, agent: str) -> str:
        """The durable priority queue an agent consumes: ``agents.<agent>``."""
        return f"{self.queue_prefix}{agent}"

    @property
    def requests_dead_letter_exchange(self) -> str:
        """Where rejected requests go (direct, key = agent): ``agents.dlx``."""
        return f"{self.requests_exchange}{self.dead_letter_exchange_suffix}"

    def agent_dead_letter_queue(self, agent: str) -> str:
        """Requests an agent could not process: ``agents.<agent>.dead``."""
        return f"{self.agent_queue(agent)}{self.dead_letter_suffix}"

    def agent_retry_queue(self, agent: str, delay_ms: int) -> str:
        """A delay tier: ``agents.<agent>.retry.<delay_ms>``; its TTL leads back to work."""
        return f"{self.agent_queue(agent)}.retry.{delay_ms}"

    def may_reply_to(self, reply_to: str) -> bool:
        """Whether a worker may send a reply to ``reply_to``: a short string (AMQP
        limit), and not one of the library's own agent or event queues, so that a
        request cannot make a worker post into another agent's queue.
        """
        return len(reply_to.encode()) <= 255 and not reply_to.startswith(
            (self.queue_prefix, self.event_queue_prefix)
        )

    def group_queue(self, group: str) -> str:
        """The durable queue a subscriber group shares: ``events.<group>``."""
        return f"{self.event_queue_prefix}{group}"

    @property
    def events_dead_letter_exchange(self) -> str:
        """Where rejected events go (direct, key = group): ``events.dlx``."""
        return f"{self.events_exchange}{self.dead_letter_exchange_suffix}"

    def group_dead_letter_queue(self, group: str) -> str:
        """Events a group could not process: ``events.<group>.dead``."""
        return f"{self.group_queue(group)}{self.dead_letter_suffix}"

    # -- declarations ------------------------------------------------------------------

    def agent_type(self, agent: str) -> QueueType:
        """The queue type of an agent's queues."""
        return self.queue_types.get(agent, self.queue_type)

    def group_type(self, group: str) -> QueueType:
        """The queue type of a subscriber group's queues."""
        return self.queue_types.get(f"events:{group}", self.queue_type)

    def agent_queue_spec(self, agent: str) -> QueueSpec:
        """An agent's work queue. No dead-letter exchange: a request that expires while
        queued (its caller gave up) must vanish; the worker dead-letters explicitly,
        with headers saying why."""
        if self.agent_type(agent) is QueueType.QUORUM:
            arguments: dict[str, HeaderValue] = {"x-queue-type": QueueType.QUORUM.value}
        else:
            arguments = {"x-max-priority": self.max_priority}
        return QueueSpec(self.agent_queue(agent), arguments=arguments)

    def agent_dead_letter_spec(self, agent: str) -> QueueSpec:
        """An agent's dead-letter queue (bound to the requests' dead-letter exchange)."""
        return self._plain(self.agent_dead_letter_queue(agent), self.agent_type(agent))

    def agent_retry_spec(self, agent: str, delay_ms: int) -> QueueSpec:
        """A delay tier: messages wait ``delay_ms``, then the broker dead-letters them
        back to the agent's queue through the default exchange."""
        arguments: dict[str, HeaderValue] = {
            "x-message-ttl": delay_ms,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.agent_queue(agent),
        }
        if self.agent_type(agent) is QueueType.QUORUM:
            arguments |= {
                "x-queue-type": QueueType.QUORUM.value,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            }
        return QueueSpec(self.agent_retry_queue(agent, delay_ms), arguments=arguments)

    def group_queue_spec(self, group: str) -> QueueSpec:
        """A subscriber group's shared queue; rejected events go to its dead letters."""
        arguments: dict[str, HeaderValue] = {
            "x-dead-letter-exchange": self.events_dead_letter_exchange,
            "x-dead-letter-routing-key": group,
        }
        if self.group_type(group) is QueueType.QUORUM:
            arguments["x-queue-type"] = QueueType.QUORUM.value
        return QueueSpec(self.group_queue(group), arguments=arguments)

    def group_dead_letter_spec(self, group: str) -> QueueSpec:
        """A group's dead-letter queue (bound to the events' dead-letter exchange)."""
        return self._plain(self.group_dead_letter_queue(group), self.group_type(group))

    @staticmethod
    def private_queue_spec() -> QueueSpec:
        """A server-named queue for one connection (a reply queue, a subscriber without a
        group): exclusive, so RabbitMQ 4.x accepts it though it is not durable."""
        return QueueSpec(name="", durable=False, exclusive=True, auto_delete=True)

    @staticmethod
    def _plain(name: str, queue_type: QueueType) -> QueueSpec:
        if queue_type is QueueType.QUORUM:
            return QueueSpec(name, arguments={"x-queue-type": QueueType.QUORUM.value})
        return QueueSpec(name)
