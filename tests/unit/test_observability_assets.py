"""The dashboard and alert rules in deploy/ name only what the library exports.

Every ``amqp_agents_*`` name in the PromQL of ``deploy/grafana/amqp-agents.json`` and
``deploy/prometheus/alerts.yml`` must be a series a :class:`Metrics` registry exposes,
and every label used in a selector, a ``by``/``without`` clause, a legend or an alert
annotation must be one that series carries (or one Prometheus attaches: job, instance).
So renaming a metric or a label fails here instead of leaving a blank panel or an alert
that can never fire. The few series from elsewhere (``up``, RabbitMQ's per-queue
metrics) are listed in EXTERNAL_SERIES; tests/integration/test_prometheus.py checks
them, and every query, against a real Prometheus scraping a worker and RabbitMQ.
The rules file is read by a small line reader made for its one shape, cross-checked
against the ``expr:`` lines.
"""

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

from amqp_agents.cli import main
from amqp_agents.metrics import CONSUMER_END_REASONS, DeliveryOutcome, Metrics, code_label
from amqp_agents.models.messages import ErrorCode

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "amqp-agents.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"

TARGET_LABELS = frozenset({"job", "instance"})
"""Labels Prometheus attaches to every series it scrapes."""
WORKER_JOB = "amqp-agents-worker"
EXTERNAL_SERIES = {
    "up": frozenset(),
    # rabbitmq_prometheus, /metrics/detailed?family=queue_coarse_metrics&family=queue_consumer_count
    "rabbitmq_detailed_queue_consumers": frozenset({"vhost", "queue"}),
    "rabbitmq_detailed_queue_messages_ready": frozenset({"vhost", "queue"}),
}
"""Series the rules and the dashboard read that the library does not export."""
GRAFANA_VARIABLES = frozenset({"__rate_interval", "__interval", "__range"})
AGGREGATIONS = frozenset(
    {"sum", "avg", "min", "max", "count", "group", "stddev", "stdvar", "topk", "bottomk"}
    | {"quantile", "count_values"}
)
CODE_LABELS = frozenset(
    {code_label(code.value) for code in ErrorCode} | {code_label(None), code_label("APP_CODE")}
)
LABEL_VALUES = {
    "code": CODE_LABELS,
    # messages_handled and events_consumed use DeliveryOutcome; rpc_calls uses ok or the code.
    "outcome": frozenset(outcome.value for outcome in DeliveryOutcome) | CODE_LABELS,
    "reason": frozenset(CONSUMER_END_REASONS),
    "job": frozenset({WORKER_JOB}),
}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_SELECTOR = re.compile(r"\b(amqp_agents_[a-z0-9_]+|rabbitmq_[a-z0-9_]+|up(?=\s*\{))\s*(\{[^}]*\})?")
_MATCHER = re.compile(
    r'\s*([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`)\s*(,|$)'
)
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_TEMPLATE_LABEL = re.compile(r"{{\s*\$?(?:labels\.)?(\w+)\s*}}|\$labels\.(\w+)")


def _exposed_series() -> tuple[dict[str, frozenset[str]], dict[str, frozenset[str]]]:
    """Every series name a registry exposes with its label names, and each family's series.

    A labelled metric exposes nothing until a label set is used, so each gets one.
    """
    metrics = Metrics()
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase) and metric._labelnames:
            metric.labels(*("x" for _ in metric._labelnames))
    series: dict[str, set[str]] = {}
    families: dict[str, frozenset[str]] = {}
    for family in metrics.registry.collect():
        families[family.name] = frozenset(sample.name for sample in family.samples)
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    exposed = {name: frozenset(labels) for name, labels in series.items()}
    return exposed | EXTERNAL_SERIES, families


SERIES, FAMILIES = _exposed_series()
NAMES = Metrics.names() | EXTERNAL_SERIES.keys()


def _mask_strings(expr: str) -> str:
    """``expr`` with the inside of every string literal blanked, offsets unchanged."""
    return _STRING.sub(lambda m: m[0][0] + "_" * (len(m[0]) - 2) + m[0][-1], expr)


def _paren_pairs(masked: str) -> dict[int, int]:
    """Offsets of matching parentheses, both ways. Raises ValueError if unbalanced."""
    pairs: dict[int, int] = {}
    opened: list[int] = []
    for index, char in enumerate(masked):
        if char == "(":
            opened.append(index)
        elif char == ")":
            if not opened:
                raise ValueError(f"unbalanced ')' at offset {index}")
            start = opened.pop()
            pairs[start], pairs[index] = index, start
    if opened:
        raise ValueError(f"unbalanced '(' at offset {opened[-1]}")
    return pairs


def _metrics_in(expr: str) -> list[tuple[int, str]]:
    """(offset, name) of every amqp_agents_*, rabbitmq_* and up{...} name in ``expr``."""
    return [(m.start(), m[1]) for m in _SELECTOR.finditer(_mask_strings(expr))]


def _labels_in(expr: str, series: Mapping[str, frozenset[str]] = SERIES) -> frozenset[str]:
    """Labels a result of ``expr`` can carry: those of its metrics and the target's."""
    labels = set(TARGET_LABELS)
    for _, name in _metrics_in(expr):
        labels |= series.get(name, frozenset())
    return frozenset(labels)


def _value_problems(label: str, op: str, value: str) -> list[str]:
    allowed = LABEL_VALUES.get(label)
    if allowed is None or "$" in value:
        return []
    if op in ("=", "!="):
        values = [value]
    elif re.fullmatch(r"[\w|]+", value):
        values = value.split("|")
    else:
        return []
    return [f"{label}={v!r} is never exported" for v in values if v not in allowed]


def expr_problems(expr: str, series: Mapping[str, frozenset[str]] = SERIES) -> list[str]:
    """What in one PromQL expression names a metric, label or value we do not export."""
    masked = _mask_strings(expr)
    try:
        pairs = _paren_pairs(masked)
    except ValueError as exc:
        return [str(exc)]
    problems: list[str] = []
    found = _metrics_in(expr)
    for match in _SELECTOR.finditer(masked):
        name = match[1]
        if name not in NAMES:
            problems.append(f"{name} is not in Metrics.names()")
            continue
        if name not in series:
            problems.append(f"{name} is in Metrics.names() but no sample has that name")
            continue
        if match[2] is None:
            continue
        body, pos = expr[match.start(2) + 1 : match.end(2) - 1], 0
        while pos < len(body) and body[pos:].strip():
            matcher = _MATCHER.match(body, pos)
            if matcher is None:
                problems.append(f"cannot read the selector {{{body}}}")
                break
            label, op, value = matcher[1], matcher[2], matcher[3][1:-1]
            if label not in series[name] | TARGET_LABELS:
                problems.append(f"{name} has no label {label!r}")
            problems += _value_problems(label, op, value)
            pos = matcher.end()
    for clause in _GROUPING.finditer(masked):
        labels = [label.strip() for label in clause[2].split(",") if label.strip()]
        if clause[1] not in ("by", "without"):
            union = _labels_in(expr, series)
            problems += [
                f"no metric has {label!r} ({clause[1]})" for label in labels if label not in union
            ]
            continue
        before = masked[: clause.start()].rstrip()
        after = clause.end() + len(masked[clause.end() :]) - len(masked[clause.end() :].lstrip())
        operator = re.search(r"(\w+)$", before)
        if operator and operator[1] in AGGREGATIONS and masked[after : after + 1] == "(":
            scope = (after, pairs[after])
        elif before.endswith(")"):
            scope = (pairs[len(before) - 1], len(before) - 1)
        else:
            problems.append(f"cannot tell what `{clause[0]}` applies to")
            continue
        for offset, name in found:
            if scope[0] < offset < scope[1] and name in series:
                problems += [
                    f"{clause[1]} ({label}) over {name}, which has no such label"
                    for label in labels
                    if label not in series[name] | TARGET_LABELS
                ]
    return problems


# -- the checker itself --------------------------------------------------------------


def test_exposed_series_are_what_metrics_names_lists() -> None:
    """The series read off a live registry are a subset of Metrics.names()."""
    assert set(SERIES) <= NAMES
    assert SERIES["amqp_agents_queue_depth"] == {"queue"}
    assert SERIES["amqp_agents_handler_duration_seconds_bucket"] == {"agent", "action", "le"}


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("amqp_agents_queue_dept", "not in Metrics.names()"),
        ("rate(amqp_agents_retries[5m])", "no sample has that name"),
        ('amqp_agents_queue_depth{agent="a"}', "has no label 'agent'"),
        ("sum by (queue) (rate(amqp_agents_retries_total[5m]))", "by (queue) over"),
        ("sum(rate(amqp_agents_retries_total[5m])) by (code)", "by (code) over"),
        ('amqp_agents_messages_handled_total{outcome="acked"}', "outcome='acked'"),
        ('amqp_agents_error_replies_total{code=~"TIMEOUT|BOOM"}', "code='BOOM'"),
        ("sum by (agent) (amqp_agents_in_flight", "unbalanced"),
        ("amqp_agents_in_flight / on (agent) amqp_agents_concurrency_limit", "'agent' (on)"),
        ("rabbitmq_detailed_queue_consumer", "not in Metrics.names()"),
        ('rabbitmq_detailed_queue_consumers{queues="a"}', "has no label 'queues'"),
        ('up{job="amqp-agents"}', "job='amqp-agents'"),
        ('amqp_agents_consumer_cancels_total{reason="deleted"}', "reason='deleted'"),
    ],
)
def test_checker_reports_drift(expr: str, problem: str) -> None:
    """Each kind of drift is caught (so the checks below can fail)."""
    assert any(problem in found for found in expr_problems(expr)), expr_problems(expr)


def test_checker_accepts_valid_promql() -> None:
    """Correct names, labels, values, both aggregation forms and target labels pass."""
    latency = (
        "histogram_quantile(0.99, sum by (agent, le) "
        '(rate(amqp_agents_handler_duration_seconds_bucket{agent=~"$agent"}[5m])))'
    )
    failures = 'sum(rate(amqp_agents_messages_handled_total{outcome!="ok"}[5m])) by (instance)'
    assert expr_problems(f"{latency} and {failures}") == []


# -- the dashboard -------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def _panels() -> list[dict[str, Any]]:
    return [panel for panel in _dashboard()["panels"] if panel.get("type") != "row"]


def _panel_metrics(panel: dict[str, Any]) -> set[str]:
    return {name for target in panel["targets"] for _, name in _metrics_in(target["expr"])}


def _variables() -> dict[str, dict[str, Any]]:
    return {var["name"]: var for var in _dashboard()["templating"]["list"]}


def test_dashboard_panels_have_a_title_and_a_query() -> None:
    """Every panel has a title and at least one target with an expr, on ${datasource}."""
    panels = _panels()
    assert panels
    for panel in panels:
        assert panel.get("title"), panel
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel.get("targets"), panel["title"]
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), panel["title"]
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_names_only_exported_metrics_and_labels() -> None:
    """Exprs, variable queries and legends use exported names and labels only."""
    problems: list[str] = []
    for panel in _panels():
        for target in panel["targets"]:
            expr = target["expr"]
            problems += [f"{panel['title']}: {p}" for p in expr_problems(expr)]
            for legend in _TEMPLATE_LABEL.finditer(target.get("legendFormat", "")):
                if (legend[1] or legend[2]) not in _labels_in(expr):
                    problems.append(f"{panel['title']}: legend {legend[0]} is not on {expr}")
    for name, var in _variables().items():
        if var["type"] != "query":
            continue
        query = var["definition"]
        found = re.fullmatch(r"label_values\((amqp_agents_[a-z0-9_]+),\s*(\w+)\)", query)
        assert found, f"${name}: {query}"
        assert var["query"]["query"] == query
        problems += [f"${name}: {p}" for p in expr_problems(found[1])]
        if found[2] not in SERIES.get(found[1], frozenset()):
            problems.append(f"${name}: {found[1]} has no label {found[2]!r}")
    assert problems == []


def test_dashboard_variables() -> None:
    """A Prometheus data source variable, agent and queue; exprs use only those."""
    variables = _variables()
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"agent", "queue"} <= variables.keys()
    used = {
        name
        for panel in _panels()
        for target in panel["targets"]
        for name in re.findall(r"\$\{?(\w+)", target["expr"])
    }
    assert used <= variables.keys() | GRAFANA_VARIABLES
    assert {"agent", "queue"} <= used


def test_dashboard_leads_with_queue_depth_and_consumers() -> None:
    """The top row holds the queue depth panel with the consumers panel beside it."""
    top = [panel for panel in _panels() if panel["gridPos"]["y"] == 0]
    top_metrics = {name for panel in top for name in _panel_metrics(panel)}
    assert {"amqp_agents_queue_depth", "amqp_agents_queue_consumers"} <= top_metrics
    depth = next(p for p in top if "amqp_agents_queue_depth" in _panel_metrics(p))
    assert depth["gridPos"]["x"] == 0
    assert "queue depth" in depth["title"].lower()


def test_dashboard_layout_has_no_overlaps() -> None:
    """Unique panel ids; panels inside the 24-column grid and never on top of each other."""
    panels = _panels()
    assert len({panel["id"] for panel in panels}) == len(panels)
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_shows_every_metric() -> None:
    """A metric added to Metrics needs a panel: every family appears in some expr."""
    used = {name for panel in _panels() for name in _panel_metrics(panel)}
    assert [family for family, series in FAMILIES.items() if not series & used] == []


# -- the alert rules -----------------------------------------------------------------


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def _alert_rules(text: str) -> list[dict[str, str]]:
    """Each ``- alert:`` item as {dotted key: text}: plain, quoted and block scalars."""
    rules: list[dict[str, str]] = []
    rule: dict[str, str] | None = None
    parents: list[tuple[int, str]] = []
    lines = text.splitlines()
    index, base = 0, 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        item = re.match(r"(\s*)- alert:\s*(.+)$", line)
        if item:
            rule, base, parents = {"alert": item[2].strip()}, len(item[1]) + 2, []
            rules.append(rule)
            continue
        entry = re.match(r"(\s*)([A-Za-z_]\w*):(?:\s+(.*))?$", line)
        indent = len(line) - len(line.lstrip())
        if rule is None or entry is None or indent < base:
            rule = None if indent < base else rule
            continue
        while parents and parents[-1][0] >= indent:
            parents.pop()
        key = ".".join([*(name for _, name in parents), entry[2]])
        value = (entry[3] or "").strip()
        if value in ("|", "|-", ">", ">-"):
            block: list[str] = []
            while index < len(lines) and (
                not lines[index].strip() or len(lines[index]) - len(lines[index].lstrip()) > indent
            ):
                block.append(lines[index].strip())
                index += 1
            rule[key] = ("\n" if value.startswith("|") else " ").join(filter(None, block))
        elif value:
            rule[key] = _unquote(value)
        else:
            parents.append((indent, entry[2]))
    return rules


def test_alert_reader_sees_every_rule_and_expr() -> None:
    """The line reader finds as many rules and exprs as the file has ``alert:``/``expr:`` lines."""
    text = ALERTS.read_text(encoding="utf-8")
    rules = _alert_rules(text)
    assert len(rules) == len(re.findall(r"^\s*- alert:", text, re.MULTILINE)) > 0
    assert len(rules) == len(re.findall(r"^\s*expr:", text, re.MULTILINE))
    assert all(rule.get("expr") for rule in rules)
    assert len({rule["alert"] for rule in rules}) == len(rules)


def test_alert_rules_name_only_exported_metrics_and_labels() -> None:
    """Every expr uses exported names and labels; annotations use labels the result has."""
    problems: list[str] = []
    for rule in _alert_rules(ALERTS.read_text(encoding="utf-8")):
        expr = rule["expr"]
        problems += [f"{rule['alert']}: {p}" for p in expr_problems(expr)]
        if not _metrics_in(expr):
            problems.append(f"{rule['alert']}: names no metric we know")
        for key in ("annotations.summary", "annotations.description"):
            for found in re.finditer(r"\$labels\.(\w+)", rule.get(key, "")):
                if found[1] not in _labels_in(expr):
                    problems.append(f"{rule['alert']}: {key} uses {found[0]}, not on the result")
    assert problems == []


def test_every_alert_has_for_severity_and_annotations() -> None:
    """for, labels.severity, annotations.summary and .description on every rule."""
    for rule in _alert_rules(ALERTS.read_text(encoding="utf-8")):
        assert re.fullmatch(r"\d+[smhdwy]", rule.get("for", "")), rule["alert"]
        assert rule.get("labels.severity") in {"critical", "warning", "info"}, rule["alert"]
        assert rule.get("annotations.summary"), rule["alert"]
        assert rule.get("annotations.description"), rule["alert"]


def test_alert_rules_cover_the_briefed_failures() -> None:
    """Depth growth, orphaned queues, errors, latency, dead letters, connection, probes."""
    exprs = [rule["expr"] for rule in _alert_rules(ALERTS.read_text(encoding="utf-8"))]
    for needle in (
        "deriv(amqp_agents_queue_depth",
        "amqp_agents_queue_consumers",
        "amqp_agents_error_replies_total",
        "amqp_agents_handler_duration_seconds_bucket",
        "amqp_agents_dead_letters_total",
        "amqp_agents_connection_losses_total",
        "amqp_agents_queue_depth_errors_total",
        "amqp_agents_consumer_attached",
        "amqp_agents_consumer_cancels_total",
        # what a dead worker cannot report: its scrape, and RabbitMQ's consumer count
        f'up{{job="{WORKER_JOB}"}}',
        "rabbitmq_detailed_queue_consumers",
    ):
        assert any(needle in expr for expr in exprs), needle


def test_alert_rules_read_only_the_scraped_rabbitmq_families() -> None:
    """RabbitMQ series in the rules come from the families prometheus.yml asks for."""
    config = PROMETHEUS.read_text(encoding="utf-8")
    assert re.search(r"job_name:\s*rabbitmq\b", config)
    assert "metrics_path: /metrics/detailed" in config
    families = re.search(r"family:\s*\[([^\]]*)\]", config)
    assert families
    assert {f.strip() for f in families[1].split(",")} == {
        "queue_coarse_metrics",
        "queue_consumer_count",
    }
    used = {
        name
        for rule in _alert_rules(ALERTS.read_text(encoding="utf-8"))
        for _, name in _metrics_in(rule["expr"])
        if name.startswith("rabbitmq_")
    }
    assert used == {name for name in EXTERNAL_SERIES if name.startswith("rabbitmq_")}


# -- the scrape config ---------------------------------------------------------------


def test_prometheus_scrapes_the_metrics_port_and_loads_the_alerts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """prometheus.yml loads alerts.yml and scrapes worker:9100, the port the docs pass
    to ``--metrics-port``, which ``amqp-agents run`` accepts."""
    config = PROMETHEUS.read_text(encoding="utf-8")
    rule_files = re.search(r"^rule_files:\n((?:\s+- .+\n)+)", config, re.MULTILINE)
    assert rule_files
    assert [line.strip("- \n") for line in rule_files[1].splitlines()] == ["alerts.yml"]
    assert (PROMETHEUS.parent / "alerts.yml").is_file()
    assert re.search(rf"job_name:\s*{WORKER_JOB}\n", config)
    assert re.search(r"-\s*worker:9100\b", config)
    for doc in (ROOT / "README.md", ROOT / "deploy" / "README.md"):
        assert "--metrics-port 9100" in doc.read_text(encoding="utf-8"), doc
    with pytest.raises(SystemExit) as exited:
        main(["run", "--help"])
    assert exited.value.code == 0
    assert "--metrics-port" in capsys.readouterr().out
