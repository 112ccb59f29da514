"""Metrics.initialise: every known label set exists at 0 before the first event.

Prometheus cannot see a counter's first increment (increase() needs an earlier sample)
and a panel shows "No data" for a series that does not exist yet, so the worker creates
its label sets when it starts. tests/integration/test_prometheus.py checks, on a real
worker under load, that no new label set of these families appears afterwards.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from amqp_agents.cli.worker import initialise_metrics as _initialise_metrics
from amqp_agents.config import Settings
from amqp_agents.examples.tasks import app
from amqp_agents.metrics import CONSUMER_END_REASONS, OTHER_ACTION, DeliveryOutcome, Metrics
from amqp_agents.models.messages import ErrorCode
from amqp_agents.transport.base import EndReason


def _samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for sample in family.samples
    }


def _label_sets(metrics: Metrics, name: str) -> set[frozenset[tuple[str, str]]]:
    return {labels for sample, labels in _samples(metrics) if sample == name}


def test_initialise_creates_every_label_set_at_zero() -> None:
    """Agents x actions (+other) x outcomes/codes, groups, probed and consumed queues."""
    metrics = Metrics()
    metrics.initialise(
        actions={"billing": ["charge", "refund"]},
        groups=["audit"],
        queues=["agents.billing", "agents.billing.dead"],
        consumed_queues=["agents.billing"],
    )
    codes = {code.value for code in ErrorCode} | {"OTHER"}
    actions = {"charge", "refund", OTHER_ACTION}
    assert _label_sets(metrics, "amqp_agents_dead_letters_total") == {
        frozenset({("agent", "billing"), ("code", code)}) for code in codes
    }
    assert _label_sets(metrics, "amqp_agents_messages_handled_total") == {
        frozenset({("agent", "billing"), ("action", action), ("outcome", outcome.value)})
        for action in actions
        for outcome in DeliveryOutcome
    }
    assert len(_label_sets(metrics, "amqp_agents_error_replies_total")) == len(actions) * len(codes)
    for name in (
        "amqp_agents_retries_total",
        "amqp_agents_handler_timeouts_total",
        "amqp_agents_handler_duration_seconds_count",
    ):
        assert _label_sets(metrics, name) == {
            frozenset({("agent", "billing"), ("action", action)}) for action in actions
        }, name
    assert _label_sets(metrics, "amqp_agents_events_consumed_total") == {
        frozenset({("group", "audit"), ("outcome", outcome.value)}) for outcome in DeliveryOutcome
    }
    assert _label_sets(metrics, "amqp_agents_queue_depth_errors_total") == {
        frozenset({("queue", "agents.billing")}),
        frozenset({("queue", "agents.billing.dead")}),
    }
    assert _label_sets(metrics, "amqp_agents_consumer_cancels_total") == {
        frozenset({("queue", "agents.billing"), ("reason", reason)})
        for reason in CONSUMER_END_REASONS
    }
    counters = {
        key: value
        for key, value in _samples(metrics).items()
        if key[0].endswith(("_total", "_count", "_bucket", "_sum"))
    }
    assert counters
    assert set(counters.values()) == {0.0}


def test_initialise_leaves_the_attached_gauge_and_depth_alone() -> None:
    """consumer_attached 0 would claim a re-attach; depth/consumers come from probes."""
    metrics = Metrics()
    metrics.initialise(actions={"a": ["x"]}, queues=["agents.a"], consumed_queues=["agents.a"])
    names = {name for name, _ in _samples(metrics)}
    assert "amqp_agents_consumer_attached" not in names
    assert "amqp_agents_queue_depth" not in names
    assert "amqp_agents_queue_consumers" not in names


def test_initialise_is_idempotent_and_keeps_counts() -> None:
    """A second call (a reconnect) neither resets nor duplicates anything."""
    metrics = Metrics()
    metrics.initialise(actions={"a": ["x"]})
    metrics.child(metrics.dead_letters, "a", "TIMEOUT").inc()
    before = _samples(metrics)
    metrics.initialise(actions={"a": ["x"]})
    assert _samples(metrics) == before
    assert (
        before[("amqp_agents_dead_letters_total", frozenset({("agent", "a"), ("code", "TIMEOUT")}))]
        == 1
    )


def test_the_cli_initialises_the_example_apps_labels() -> None:
    """`amqp-agents run` covers each agent's actions, its event groups and its queues."""
    metrics = Metrics()
    agents = app()
    _initialise_metrics(metrics, agents, Settings())
    handled = _label_sets(metrics, "amqp_agents_messages_handled_total")
    for agent in agents:
        for action in {*agent.action_names, OTHER_ACTION}:
            assert (
                frozenset({("agent", agent.name), ("action", action), ("outcome", "ok")}) in handled
            )
    assert frozenset({("group", "audit"), ("outcome", "ok")}) in _label_sets(
        metrics, "amqp_agents_events_consumed_total"
    )
    probed = {
        dict(labels)["queue"]
        for labels in _label_sets(metrics, "amqp_agents_queue_depth_errors_total")
    }
    assert probed == {
        "agents.task_manager",
        "agents.task_manager.dead",
        "agents.audit",
        "agents.audit.dead",
        "agents.planner",
        "agents.planner.dead",
        "events.audit",
        "events.audit.dead",
    }


def test_the_cancel_reasons_are_the_transports_end_reasons() -> None:
    """metrics is a leaf and spells the reasons itself: they must stay the ones the
    transports report (EndReason), or the initialised series would be the wrong ones."""
    assert set(CONSUMER_END_REASONS) == {reason.value for reason in EndReason}
