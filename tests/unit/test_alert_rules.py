"""The alert rules behave: ``promtool`` checks them and runs their unit tests.

``deploy/prometheus/alerts.test.yml`` holds a firing and a quiet case for every alert,
including the two outages of issue #16 (the only worker SIGKILLed; an agent queue
without a consumer under a running worker). promtool compares annotations verbatim, so
it gets a copy of the rules without them; their templates are checked by
``promtool check rules``. The rules of issue #16's review are run against the same
cases to show the cases catch what was wrong with them. ``promtool`` is required: it
comes with Debian's ``prometheus`` package (.ci/run installs it); a missing one fails.

``python -m tests.unit.test_alert_rules`` runs the unit tests by hand.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
MANIFEST = ROOT / "deploy" / "k8s" / "prometheusrule.yaml"
GENERATOR = ROOT / "scripts" / "prometheusrule"
DASHBOARD = ROOT / "deploy" / "grafana" / "amqp-agents.json"

# Rules as they were when issue #16 was filed: each must fail the unit tests.
_QUEUES = 'queue!~".+[.]dead|.+[.]retry[.].+"'
OLD_RULES = {
    "AmqpAgentsQueueWithoutConsumers": (
        f"max by (queue) (amqp_agents_queue_consumers{{{_QUEUES}}}) == 0 and "
        f"max by (queue) (amqp_agents_queue_depth{{{_QUEUES}}}) > 0"
    ),
    "AmqpAgentsHighErrorRate": (
        "sum by (agent) (rate(amqp_agents_error_replies_total[10m])) / "
        "sum by (agent) (rate(amqp_agents_messages_handled_total[10m])) > 0.05"
    ),
    "AmqpAgentsDeadLetterQueueNotEmpty": (
        'max by (queue) (amqp_agents_queue_depth{queue=~".+[.]dead"}) > 0'
    ),
    "AmqpAgentsQueueDepthGrowing": (
        f"max by (queue) (amqp_agents_queue_depth{{{_QUEUES}}}) > 1000 and "
        f"max by (queue) (deriv(amqp_agents_queue_depth{{{_QUEUES}}}[10m])) > 0"
    ),
    # the obvious target-down rule, reset by every start of a crash-looping worker
    "AmqpAgentsWorkerDown": 'up{job="amqp-agents-worker"} == 0',
}


def promtool() -> str:
    """The promtool executable; fails (never skips) the test if it is missing."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found: `apt-get install -y prometheus` (Debian's package; "
            ".ci/run installs it)",
            pytrace=False,
        )
    return path


def _rules() -> dict[str, Any]:
    rules: dict[str, Any] = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return rules


def _alerts(rules: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]


def run_rule_tests(
    directory: Path, *, replace: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run alerts.test.yml on alerts.yml without annotations (and with ``replace``'s exprs
    swapped in, by alert name), in ``directory``."""
    rules = _rules()
    for rule in _alerts(rules):
        rule.pop("annotations", None)
        if replace and rule["alert"] in replace:
            rule["expr"] = replace[rule["alert"]]
    (directory / RULES.name).write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
    shutil.copy(RULE_TESTS, directory / RULE_TESTS.name)
    return subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_promtool_checks_the_rules_and_their_templates() -> None:
    """`promtool check rules`: every expr parses, every annotation template too."""
    done = subprocess.run(
        [promtool(), "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_alerts(_rules()))} rules found" in done.stdout


def test_rule_unit_tests_pass(tmp_path: Path) -> None:
    """`promtool test rules alerts.test.yml`: each alert fires when it should, only then."""
    done = run_rule_tests(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    """alerts.test.yml expects each alert to fire somewhere and stay quiet somewhere."""
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    assert tests["rule_files"] == [RULES.name]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in _alerts(_rules())}
    assert names - firing == set(), "never expected to fire"
    assert names - quiet == set(), "never expected to stay quiet"
    assert firing | quiet <= names, "tests of alerts that do not exist"


def test_dashboard_expressions_tested_here_are_the_dashboards() -> None:
    """Each promql_expr_test of alerts.test.yml is a query of the Grafana dashboard."""
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    exprs = [check["expr"] for case in tests["tests"] for check in case.get("promql_expr_test", [])]
    assert exprs
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = {target["expr"] for panel in dashboard["panels"] for target in panel["targets"]}
    assert [expr for expr in exprs if expr not in queries] == []


@pytest.mark.parametrize("alert", sorted(OLD_RULES))
def test_the_rules_issue_16_reviewed_fail_the_cases(alert: str, tmp_path: Path) -> None:
    """The old expr of each reviewed rule fails the unit tests (so they can fail)."""
    done = run_rule_tests(tmp_path, replace={alert: OLD_RULES[alert]})
    report = done.stdout + done.stderr
    assert done.returncode != 0, report
    assert f"alertname: {alert}" in report, report


def test_prometheus_rule_manifest_is_generated_from_the_rules() -> None:
    """deploy/k8s/prometheusrule.yaml is what scripts/prometheusrule prints, and its spec
    is alerts.yml, group for group."""
    done = subprocess.run([str(GENERATOR)], capture_output=True, text=True, timeout=30, check=True)
    assert MANIFEST.read_text(encoding="utf-8") == done.stdout, (
        "run: scripts/prometheusrule > deploy/k8s/prometheusrule.yaml"
    )
    manifest = yaml.safe_load(done.stdout)
    assert (manifest["apiVersion"], manifest["kind"]) == (
        "monitoring.coreos.com/v1",
        "PrometheusRule",
    )
    assert manifest["spec"] == _rules()


def main() -> int:  # pragma: no cover - by hand
    """Run the rule unit tests and print promtool's report."""
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        done = run_rule_tests(Path(directory))
    print(done.stdout + done.stderr)
    return done.returncode


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
