"""Prometheus metrics, on an explicit registry (never the process-global default).

Build one :class:`Metrics` per process and pass it to the worker, the RPC client and
the event bus; serve ``metrics.registry`` at ``/metrics``. Labels are bounded: agent,
action (only actions the agent declares; anything else is ``other``), queue, group,
outcome and error code (the standard codes; anything else is ``OTHER``), never ids.

Names (``amqp_agents_`` prefix)::

    queue_depth{queue}                 messages ready in a queue (passive declare)
    queue_consumers{queue}             consumers of a queue
    queue_depth_errors_total{queue}    failed depth probes (missing queue, broker hiccup)
    messages_received_total{agent}     deliveries taken from an agent queue
    messages_handled_total{agent,action,outcome}
    handler_duration_seconds{agent,action}   (histogram)
    handler_timeouts_total{agent,action}
    error_replies_total{agent,action,code}
    retries_total{agent,action}        redeliveries scheduled
    dead_letters_total{agent,code}
    in_flight                          handlers running
    concurrency_limit                  handlers allowed at once
    connection_losses_total            broker connections lost
    consumer_cancels_total{queue,reason}   consumers that ended unasked (reason: the
                                       ConsumerEnd value: cancelled, channel_closed,
                                       connection_lost); each one is re-attached
    consumer_attached{queue}           1 while this process consumes the queue, 0 while
                                       it re-attaches (readiness reads the same state)
    reconnects_total                   workers restarted on a new connection after a loss
    events_published_total             events published (this process)
    events_consumed_total{group,outcome}
    rpc_calls_total{agent,action,outcome}   outcome: ok or the error code
    rpc_duration_seconds{agent,action}      (histogram, round trip)
    rpc_pending_calls                  calls waiting for their reply

A labelled counter has no series until its first increment, and Prometheus cannot see
that first increment (``increase()`` needs a sample before it): a panel says "No data"
instead of 0 and an alert on the first dead letter never fires. :meth:`Metrics.initialise`
creates, at 0, every label set a worker can know before it takes work.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from amqp_agents.errors import ErrorCode

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

__all__ = [
    "CONSUMER_END_REASONS",
    "CONTENT_TYPE",
    "OTHER_ACTION",
    "DeliveryOutcome",
    "Metrics",
    "code_label",
]

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
_PREFIX: Final = "amqp_agents"
_STANDARD_CODES: Final = frozenset(code.value for code in ErrorCode)
OTHER_ACTION: Final = "other"
"""The ``action`` label of a request for an action the agent does not declare."""
CONSUMER_END_REASONS: Final = ("cancelled", "channel_closed", "connection_lost")
"""The ``reason`` values of ``consumer_cancels_total`` (the transport's ConsumerEnd values)."""
# Latency buckets from 1 ms to 60 s: local RPC is around a millisecond.
_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class DeliveryOutcome(StrEnum):
    """How a delivery ended; the ``outcome`` label."""

    OK = "ok"
    """Handled and acked; the reply (if any) was successful."""
    ERROR = "error"
    """Handled and acked with an error reply (see ``error_replies_total``)."""
    RETRIED = "retried"
    """Sent to a retry queue for a later attempt."""
    DEAD_LETTERED = "dead_lettered"
    """Sent to the dead-letter queue."""
    REQUEUED = "requeued"
    """Given back unstarted or unfinished (shutdown, cancellation, a reply or copy the
    broker did not take)."""
    REPLY_DROPPED = "reply_dropped"
    """Handled and acked, but the broker refused its reply (full or forbidden reply
    queue): running it again could not deliver it."""
    EXPIRED = "expired"
    """Dropped: the caller's deadline had passed."""


def code_label(code: str | None) -> str:
    """An error code as a bounded label value."""
    if code is None:
        return "none"
    return code if code in _STANDARD_CODES else "OTHER"


_M = TypeVar("_M", Counter, Gauge, Histogram)


class Metrics:
    """Every metric of the library, registered on ``registry`` (a new one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

        def name(suffix: str) -> str:
            return f"{_PREFIX}_{suffix}"

        self.queue_depth = Gauge(
            name("queue_depth"), "Messages ready in the queue", ["queue"], registry=r
        )
        self.queue_consumers = Gauge(
            name("queue_consumers"), "Consumers of the queue", ["queue"], registry=r
        )
        self.queue_depth_errors = Counter(
            name("queue_depth_errors"), "Failed queue depth probes", ["queue"], registry=r
        )
        self.messages_received = Counter(
            name("messages_received"), "Deliveries taken from agent queues", ["agent"], registry=r
        )
        self.messages_handled = Counter(
            name("messages_handled"),
            "Deliveries finished, by outcome",
            ["agent", "action", "outcome"],
            registry=r,
        )
        self.handler_duration = Histogram(
            name("handler_duration_seconds"),
            "Time spent in action handlers (all tries)",
            ["agent", "action"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.handler_timeouts = Counter(
            name("handler_timeouts"),
            "Handlers that ran out of time",
            ["agent", "action"],
            registry=r,
        )
        self.error_replies = Counter(
            name("error_replies"), "Error replies sent", ["agent", "action", "code"], registry=r
        )
        self.retries = Counter(
            name("retries"),
            "Redeliveries scheduled through retry queues",
            ["agent", "action"],
            registry=r,
        )
        self.dead_letters = Counter(
            name("dead_letters"),
            "Requests sent to the dead-letter queue",
            ["agent", "code"],
            registry=r,
        )
        self.in_flight = Gauge(name("in_flight"), "Handlers running now", registry=r)
        self.concurrency_limit = Gauge(
            name("concurrency_limit"), "Handlers allowed to run at once", registry=r
        )
        self.connection_losses = Counter(
            name("connection_losses"), "Broker connections lost", registry=r
        )
        self.consumer_cancels = Counter(
            name("consumer_cancels"),
            "Consumers that ended without being asked to, by queue and reason",
            ["queue", "reason"],
            registry=r,
        )
        self.consumer_attached = Gauge(
            name("consumer_attached"),
            "1 while this process consumes the queue, 0 while it re-attaches",
            ["queue"],
            registry=r,
        )
        self.connection_blocked = Gauge(
            name("connection_blocked"),
            "1 while the broker blocks publishing (memory or disk alarm)",
            registry=r,
        )
        self.broker_connected = Gauge(
            name("broker_connected"),
            "1 for the broker node (host:port) this process is connected to",
            ["broker"],
            registry=r,
        )
        self.reconnects = Counter(
            name("reconnects"), "Workers restarted on a new connection after a loss", registry=r
        )
        self.events_published = Counter(
            name("events_published"), "Events published by this process", registry=r
        )
        self.events_consumed = Counter(
            name("events_consumed"),
            "Events handled by subscribers, by group and outcome",
            ["group", "outcome"],
            registry=r,
        )
        self.rpc_calls = Counter(
            name("rpc_calls"),
            "RPC calls made, by outcome (ok or the error code)",
            ["agent", "action", "outcome"],
            registry=r,
        )
        self.rpc_duration = Histogram(
            name("rpc_duration_seconds"),
            "RPC round trip, send to reply",
            ["agent", "action"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.rpc_pending = Gauge(
            name("rpc_pending_calls"), "RPC calls waiting for their reply", registry=r
        )

    def child(self, metric: _M, *values: str) -> _M:
        """``metric.labels(*values)``, cached: the hot path labels every message, and
        prometheus_client validates and locks on each ``labels()`` call. Label values
        are bounded by design (agents, actions, outcomes, codes), so is the cache."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def initialise(
        self,
        *,
        actions: Mapping[str, Iterable[str]],
        groups: Iterable[str] = (),
        queues: Iterable[str] = (),
        consumed_queues: Iterable[str] = (),
    ) -> None:
        """Create every known label set at 0, so each series exists before its first event.

        ``actions`` maps each agent to the actions it declares (``other`` is added);
        ``groups`` are the event groups subscribed to; ``queues`` the queues whose depth
        is probed; ``consumed_queues`` those consumed (agent and group queues). Codes are
        the standard ones and ``OTHER``; outcomes every :class:`DeliveryOutcome`. Idempotent.
        The ``consumer_attached`` gauge is left alone: 0 would claim a re-attach.
        """
        codes = sorted({code_label(code.value) for code in ErrorCode} | {code_label("")})
        for agent, names in actions.items():
            self.child(self.messages_received, agent)
            for code in codes:
                self.child(self.dead_letters, agent, code)
            for action in sorted({*names, OTHER_ACTION}):
                self.child(self.handler_duration, agent, action)
                self.child(self.handler_timeouts, agent, action)
                self.child(self.retries, agent, action)
                for outcome in DeliveryOutcome:
                    self.child(self.messages_handled, agent, action, outcome.value)
                for code in codes:
                    self.child(self.error_replies, agent, action, code)
        for group in groups:
            for outcome in DeliveryOutcome:
                self.child(self.events_consumed, group, outcome.value)
        for queue in queues:
            self.child(self.queue_depth_errors, queue)
        for queue in consumed_queues:
            for reason in CONSUMER_END_REASONS:
                self.child(self.consumer_cancels, queue, reason)

    def exposition(self) -> bytes:
        """The text format for ``/metrics``."""
        return generate_latest(self.registry)

    @staticmethod
    def names() -> frozenset[str]:
        """Every metric name as Prometheus exposes it (``_total``, ``_bucket``...)."""
        metrics = Metrics()
        exposed: set[str] = set()
        for family in metrics.registry.collect():
            exposed.add(family.name)
            if family.type == "counter":
                exposed.add(f"{family.name}_total")
                exposed.add(f"{family.name}_created")
            elif family.type == "histogram":
                exposed.update(
                    f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count", "_created")
                )
        return frozenset(exposed)
