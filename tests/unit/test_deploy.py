"""The deployment kit (deploy/, config/, .dockerignore) parses, validates and agrees with the code.

No image is built and no cluster is contacted. Built-in Kubernetes kinds are validated
offline against the schemas ``kubernetes-validate`` bundles (strict: unknown fields
fail); custom resources (KEDA, Prometheus Operator, RabbitMQ Cluster Operator) have
their required fields checked here. The cross-references are the point: ports and
probe paths against what ``amqp-agents run --metrics-port`` serves, every environment
variable against the ``Settings`` model, the scaled queue against the example app's
topology, the termination grace period against the worker's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from amqp_agents.cli.worker import worker_probes as _worker_probes
from amqp_agents.config import Settings
from amqp_agents.examples.tasks import TaskStoreSettings, app
from amqp_agents.metrics import Metrics
from amqp_agents.models.topology import QueueType, Topology
from amqp_agents.runtime.health import LoopWatch
from tests.agents_for_tests import CliProcess, cli_env, run_cli
from tests.deploy_kit import (
    COMPOSE,
    DEPLOY,
    DOCKERFILE,
    ENV_EXAMPLE,
    EXAMPLE_APP,
    JSON_EXAMPLE,
    K8S,
    METRICS_PORT,
    REDIS,
    ROOT,
    WORKER,
    configmap_env,
    dockerfile_env,
    dockerfile_stages,
    example_app_env_names,
    exec_form,
    load_yaml_documents,
    manifest,
    manifest_files,
    manifests,
    parse_dockerfile,
    prestop_sleep_s,
    secret_env,
    settings_env_names,
    worker_container,
)
from tests.support import wait_until_sync

K8S_VERSION = "1.29"
BUILTIN_KINDS = frozenset(
    {"Namespace", "ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget"}
)
SCALED_AGENT = "task_manager"

# -- helpers -------------------------------------------------------------------------


def leaf_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Dotted paths (as tuples) of every leaf field of ``model``."""
    paths: set[tuple[str, ...]] = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths |= leaf_paths(annotation, (*prefix, name))
        else:
            paths.add((*prefix, name))
    return paths


def json_leaf_paths(data: dict[str, Any], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Dotted paths of every non-object value of a JSON object (an empty object, such as a
    mapping setting at its default, is a value)."""
    paths: set[tuple[str, ...]] = set()
    for key, value in data.items():
        if isinstance(value, dict) and value:
            paths |= json_leaf_paths(value, (*prefix, key))
        else:
            paths.add((*prefix, key))
    return paths


def parse_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines of an env file (comments and blank lines skipped), in order."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}:{number}: not KEY=value: {line!r}"
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", key), f"{path}:{number}: bad name {key!r}"
        assert not value.startswith(("'", '"')), f"{path}:{number}: quoted value"
        assert key not in values, f"{path}:{number}: {key} twice"
        values[key] = value
    return values


def clear_amqp_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove every AMQP_* variable of the developer's or CI's environment."""
    for name in list(os.environ):
        if name.upper().startswith("AMQP_"):
            monkeypatch.delenv(name)


def settings_from_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Settings:
    """``Settings()`` read from exactly ``env``."""
    clear_amqp_env(monkeypatch)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def default_settings(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The defaults, as a comparable dump (secrets revealed)."""
    return dump(settings_from_env(monkeypatch, {}))


def dump(settings: Settings) -> dict[str, Any]:
    """A settings dump with secrets revealed, for comparisons."""
    data = settings.model_dump()
    data["url"] = settings.url.get_secret_value()
    data["connection"]["url"] = settings.connection.url.get_secret_value()
    return data


def example_app_queues(topology: Topology) -> set[str]:
    """The agent queues (and their dead-letter queues) the example app declares."""
    names = {agent.name for agent in app()}
    return {topology.agent_queue(n) for n in names} | {
        topology.agent_dead_letter_queue(n) for n in names
    }


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """A matchLabels selector selects ``labels``."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# -- every YAML loads; built-in kinds validate -----------------------------------------


def test_every_yaml_file_of_the_kit_loads() -> None:
    """Every .yml/.yaml under deploy/ is valid YAML made of mappings."""
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert len(files) >= 12, files
    for path in files:
        load_yaml_documents(path)


def test_manifests_have_the_expected_kinds() -> None:
    """deploy/k8s holds the worker, its settings, scaling, monitoring and an example broker."""
    kinds = sorted(doc["kind"] for _path, doc in manifests())
    assert kinds == sorted(
        [
            *BUILTIN_KINDS,
            "Deployment",  # Redis, the example app's shared task store
            "Service",
            "ScaledObject",
            "TriggerAuthentication",
            "ServiceMonitor",
            "ServiceMonitor",
            "PrometheusRule",
            "RabbitmqCluster",
        ]
    )
    for path, doc in manifests():
        assert doc.get("apiVersion"), path
        assert re.fullmatch(r"[a-z0-9-]{1,63}", doc["metadata"]["name"]), path


@pytest.mark.parametrize(
    ("path", "doc"),
    [(p, d) for p, d in manifests() if d["kind"] in BUILTIN_KINDS],
    ids=lambda value: value.name if isinstance(value, Path) else value["kind"],
)
def test_builtin_kinds_validate_against_the_kubernetes_schema(
    path: Path, doc: dict[str, Any]
) -> None:
    """Deployment, Service, ConfigMap, Secret, PDB, Namespace: valid for Kubernetes 1.29."""
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.path)
        pytest.fail(f"{path.name}: {doc['kind']} invalid at {where}: {exc.message}")


def test_schema_validation_rejects_a_misspelt_field() -> None:
    """The validator is strict: a field Kubernetes does not know fails (no silent pass)."""
    deployment = manifest("Deployment", WORKER)
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    """kustomization.yaml names every manifest (and they exist); the fake Secret stays out."""
    listed: set[Path] = set()
    for kustomization in sorted(K8S.rglob("kustomization.yaml")):
        [doc] = load_yaml_documents(kustomization)
        assert doc["kind"] == "Kustomization"
        for entry in doc["resources"]:
            target = (kustomization.parent / entry).resolve()
            assert target.exists(), f"{kustomization}: {entry} does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").exists(), target
            else:
                listed.add(target)
    expected = {p.resolve() for p in manifest_files()} - {(K8S / "secret.example.yaml").resolve()}
    assert listed == expected
    [top] = load_yaml_documents(K8S / "kustomization.yaml")
    assert top["namespace"] == manifest("Namespace")["metadata"]["name"]
    assert "rabbitmq" in top["resources"]
    assert [image["name"] for image in top["images"]] == [worker_container()["image"].split(":")[0]]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_builds_the_kit() -> None:
    """`kubectl kustomize deploy/k8s` (offline) renders every object in the namespace."""
    done = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    objects = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    assert len(objects) == len(manifests()) - 1  # all but the example Secret
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "amqp-agents", obj["metadata"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "amqp-agents"
    [deployment] = [
        obj for obj in objects if obj["kind"] == "Deployment" and obj["metadata"]["name"] == WORKER
    ]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "amqp-agents:0.1.0"


# -- the Deployment against the CLI ----------------------------------------------------


def test_deployment_runs_the_image_entrypoint_on_the_example_app() -> None:
    """command = the image's entrypoint; args run the example app with --metrics-port 9100."""
    container = worker_container()
    assert container["command"] == ["amqp-agents"]
    args = container["args"]
    assert args[args.index("run") :] == ["run", EXAMPLE_APP, "--metrics-port", str(METRICS_PORT)]
    assert set(args[: args.index("run")]) <= {"--log-json"}  # global options only


def test_ports_and_probes_match_what_the_cli_serves() -> None:
    """Container port = --metrics-port; liveness /healthz, readiness /readyz on it; the
    CLI's worker routes are exactly /healthz, /readyz and /metrics."""
    stand_in = SimpleNamespace(consumers_lost=False, is_ready=True)
    routes = _worker_probes(stand_in, Metrics(), LoopWatch(), 5.0)  # type: ignore[arg-type]
    assert set(routes) == {"/healthz", "/readyz", "/metrics"}

    container = worker_container()
    [port] = container["ports"]
    assert (port["name"], port["containerPort"], port["protocol"]) == (
        "metrics",
        METRICS_PORT,
        "TCP",
    )
    args = container["args"]
    assert int(args[args.index("--metrics-port") + 1]) == port["containerPort"]
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"]) == (path, port["name"]), probe
        assert get["path"] in routes
    assert "startupProbe" not in container  # liveness holds while connecting


def test_termination_grace_period_covers_prestop_and_the_worker_grace_period() -> None:
    """terminationGracePeriodSeconds > AMQP_AGENTS_WORKER__GRACE_PERIOD_S + preStop sleep."""
    pod = manifest("Deployment", WORKER)["spec"]["template"]["spec"]
    grace_s = float(configmap_env()["AMQP_AGENTS_WORKER__GRACE_PERIOD_S"])
    sleep_s = prestop_sleep_s(worker_container())
    assert 0 < sleep_s <= 15
    # Handlers still running after the grace period get up to 5 s to unwind, then close.
    assert pod["terminationGracePeriodSeconds"] >= grace_s + sleep_s + 5
    assert pod["terminationGracePeriodSeconds"] > grace_s + sleep_s


def test_rolling_update_waits_for_a_ready_replacement() -> None:
    """maxUnavailable 0: an old pod stops only once a new one consumes; no fixed replicas."""
    spec = manifest("Deployment", WORKER)["spec"]
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert "replicas" not in spec, "KEDA owns the replica count"


def test_worker_runs_unprivileged_with_a_read_only_root() -> None:
    """Non-root (the image's uid), no privilege escalation, no capabilities, read-only root."""
    pod = manifest("Deployment", WORKER)["spec"]["template"]["spec"]
    container = worker_container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_uid()
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]  # noqa: S108  # the container's /tmp


def test_worker_has_resource_requests_and_limits() -> None:
    """CPU and memory requests, both limits, requests within limits."""
    resources = worker_container()["resources"]
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
    assert parse_quantity(resources["requests"]["memory"]) <= parse_quantity(
        resources["limits"]["memory"]
    )
    assert parse_quantity(resources["requests"]["cpu"]) <= parse_quantity(
        resources["limits"]["cpu"]
    )


def parse_quantity(value: str | int) -> float:
    """A Kubernetes quantity (``100m``, ``1``, ``128Mi``) as a number."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(units.items(), key=lambda item: -len(item[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


# -- environment variables against Settings ---------------------------------------------


def test_valid_names_are_built_from_the_settings_model() -> None:
    """The name set covers nested groups (worker.retry) and rejects what Settings ignores."""
    names = settings_env_names()
    assert {
        "AMQP_URL",
        "AMQP_AGENTS_URL",
        "AMQP_AGENTS_WORKER__GRACE_PERIOD_S",
        "AMQP_AGENTS_WORKER__RETRY__MAX_DELIVERIES",
        "AMQP_AGENTS_METRICS__DEPTH_INTERVAL_S",
        "AMQP_AGENTS_TOPOLOGY__MAX_PRIORITY",
    } <= names
    assert "AMQP_AGENTS_WORKER__RETRY" not in names  # a group, not a setting
    assert "AMQP_AGENTS_CONNECTION__URL" not in names
    assert all(name == name.upper() for name in names)


def test_every_env_var_of_the_manifests_is_a_setting() -> None:
    """ConfigMap keys, Secret keys and the container's env names all exist in Settings."""
    valid = settings_env_names() | example_app_env_names()
    container = worker_container()
    names = {
        *configmap_env(),
        *secret_env(),
        *(entry["name"] for entry in container["env"]),
    }
    assert names - valid == set()
    assert "AMQP_URL" not in configmap_env(), "the URL carries the password: Secret only"
    assert set(secret_env()) == {"AMQP_URL"}


def test_deployment_reads_the_configmap_and_the_url_from_the_secret() -> None:
    """envFrom the ConfigMap; AMQP_URL through secretKeyRef to the example Secret's key."""
    container = worker_container()
    assert container["envFrom"] == [
        {"configMapRef": {"name": manifest("ConfigMap")["metadata"]["name"]}}
    ]
    env = {entry["name"]: entry for entry in container["env"]}
    ref = env["AMQP_URL"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == manifest("Secret")["metadata"]["name"]
    assert ref["key"] in secret_env()
    client_name = env["AMQP_AGENTS_CONNECTION__CLIENT_NAME"]["valueFrom"]["fieldRef"]
    assert client_name == {"fieldPath": "metadata.name"}


def test_example_secret_is_obviously_fake_and_reachable_from_keda() -> None:
    """The example password says it is fake; the host is namespaced (KEDA runs elsewhere)."""
    url = secret_env()["AMQP_URL"]
    assert "FAKE" in url
    assert "CHANGE-ME" in url
    namespace = manifest("Namespace")["metadata"]["name"]
    assert f"@amqp-agents-rabbitmq.{namespace}.svc:5672/" in url
    source = (K8S / "secret.example.yaml").read_text()
    assert "EXAMPLE ONLY" in source


def test_manifest_settings_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's environment (ConfigMap + Secret) passes Settings' validation."""
    env = {**configmap_env(), **secret_env(), "AMQP_AGENTS_CONNECTION__CLIENT_NAME": "pod-1"}
    settings = settings_from_env(monkeypatch, env)
    assert settings.worker.grace_period_s == float(env["AMQP_AGENTS_WORKER__GRACE_PERIOD_S"])
    assert settings.worker.retry.redelivery_delays_s == (1.0, 5.0, 30.0)
    assert settings.connection.client_name == "pod-1"
    assert settings.url.get_secret_value() == env["AMQP_URL"]


def test_env_example_lists_every_setting_with_its_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """config/amqp-agents.env.example: every name valid, every setting listed (the alias
    AMQP_AGENTS_URL aside), and loading it gives exactly the defaults."""
    values = parse_env_file(ENV_EXAMPLE)
    valid = settings_env_names()
    assert set(values) - valid == set(), "names Settings does not read"
    assert valid - {"AMQP_AGENTS_URL"} - set(values) == set(), "settings missing"
    assert dump(settings_from_env(monkeypatch, values)) == default_settings(monkeypatch)


def test_env_example_gives_each_setting_a_unit_or_meaning() -> None:
    """Each setting is preceded by a comment line (its unit or meaning), topology aside."""
    lines = ENV_EXAMPLE.read_text().splitlines()
    for number, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert lines[number - 1].startswith("#"), f"no comment above {line!r}"
            if line.split("=")[0].endswith("_S"):
                assert "second" in lines[number - 1] or "second" in lines[number - 2], line


def test_json_example_lists_every_setting_with_its_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """config/settings.example.json: every setting but the URL, each at its default."""
    data = json.loads(JSON_EXAMPLE.read_text())
    expected = leaf_paths(Settings) - {("url",)}
    expected = {path for path in expected if path != ("connection", "url")}
    assert json_leaf_paths(data) == expected
    clear_amqp_env(monkeypatch)
    assert dump(Settings.model_validate(data)) == default_settings(monkeypatch)


# -- KEDA, Prometheus Operator, RabbitMQ Cluster Operator --------------------------------


def test_scaled_object_scales_the_deployment_on_the_task_manager_queue() -> None:
    """ScaledObject: the Deployment, a rabbitmq QueueLength trigger on a queue the example
    app declares, 1 <= min <= max, through the TriggerAuthentication."""
    scaled = manifest("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert target["name"] == manifest("Deployment", WORKER)["metadata"]["name"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    [trigger] = spec["triggers"]
    assert trigger["type"] == "rabbitmq"
    metadata = trigger["metadata"]
    topology = Topology()
    assert metadata["queueName"] in example_app_queues(topology)
    assert metadata["queueName"] == topology.agent_queue(SCALED_AGENT)
    assert metadata["mode"] == "QueueLength"
    assert metadata["protocol"] == "amqp"
    assert isinstance(metadata["value"], str)
    assert int(metadata["value"]) >= 1
    assert "host" not in metadata, "the host carries the password: TriggerAuthentication"
    auth = manifest("TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]


def test_trigger_authentication_reads_the_host_from_the_worker_secret() -> None:
    """KEDA's host parameter comes from the same Secret key the worker reads AMQP_URL from."""
    auth = manifest("TriggerAuthentication")
    assert auth["apiVersion"] == "keda.sh/v1alpha1"
    [ref] = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "host"
    env = {entry["name"]: entry for entry in worker_container()["env"]}
    assert {"name": ref["name"], "key": ref["key"]} == env["AMQP_URL"]["valueFrom"]["secretKeyRef"]


def test_service_and_service_monitor_reach_the_metrics_port() -> None:
    """Service selects the worker pods on the container port; the ServiceMonitor selects
    the Service and scrapes /metrics on its port."""
    pod_labels = manifest("Deployment", WORKER)["spec"]["template"]["metadata"]["labels"]
    service = manifest("Service", WORKER)
    assert labels_match(service["spec"]["selector"], pod_labels)
    [port] = service["spec"]["ports"]
    assert port["targetPort"] == worker_container()["ports"][0]["name"]
    assert port["port"] == METRICS_PORT

    monitor = manifest("ServiceMonitor", "amqp-agents-worker")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert labels_match(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    [endpoint] = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == (port["name"], "/metrics")


def test_workers_share_the_kits_redis_through_its_service() -> None:
    """TASKS_STORE_URL points at the Redis Service's name and port; that Service selects
    the Redis pods, and nothing of the worker's (Service, PDB) selects them."""
    env = {entry["name"]: entry for entry in worker_container()["env"]}
    url = env["TASKS_STORE_URL"]["value"]
    service = manifest("Service", REDIS)
    [port] = service["spec"]["ports"]
    assert url == f"redis://{service['metadata']['name']}:{port['port']}/0"
    redis = manifest("Deployment", REDIS)
    pod_labels = redis["spec"]["template"]["metadata"]["labels"]
    assert labels_match(service["spec"]["selector"], pod_labels)
    [container] = redis["spec"]["template"]["spec"]["containers"]
    assert port["targetPort"] == container["ports"][0]["name"]
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+-alpine", container["image"])
    for worker_object in (manifest("Service", WORKER), manifest("PodDisruptionBudget")):
        selector = worker_object["spec"]["selector"]
        assert not labels_match(selector.get("matchLabels", selector), pod_labels)


def test_redis_runs_unprivileged_with_a_read_only_root() -> None:
    """The Redis pod: non-root, no privilege escalation, all capabilities dropped."""
    pod = manifest("Deployment", REDIS)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    [container] = pod["containers"]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])


def test_pod_disruption_budget_selects_the_workers() -> None:
    """The PDB covers the worker pods and never blocks a drain of a single replica."""
    pdb = manifest("PodDisruptionBudget")
    pod_labels = manifest("Deployment", WORKER)["spec"]["template"]["metadata"]["labels"]
    assert labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert pdb["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in pdb["spec"]


def test_rabbitmq_cluster_is_a_tested_quorum_queue_broker() -> None:
    """RabbitmqCluster: the operator's API, three replicas of RabbitMQ 4.0 (the cluster
    tests' version), and the workers' queues quorum queues, replicated on them."""
    cluster = manifest("RabbitmqCluster")
    assert cluster["apiVersion"] == "rabbitmq.com/v1beta1"
    replicas = cluster["spec"]["replicas"]
    assert isinstance(replicas, int)
    assert replicas >= 3, "a quorum queue survives the loss of a minority: three nodes at least"
    assert replicas % 2 == 1, "an even count survives no more losses than one node fewer"
    assert cluster["spec"]["image"].startswith("rabbitmq:4.0")
    # Three replicas: the ConfigMap makes every queue a quorum queue, a valid setting.
    data = configmap_env()
    assert data["AMQP_AGENTS_TOPOLOGY__QUEUE_TYPE"] == QueueType.QUORUM.value
    assert not data.get("AMQP_AGENTS_TOPOLOGY__QUEUE_TYPES"), "no queue left classic"
    note = (K8S / "rabbitmq" / "rabbitmqcluster.yaml").read_text()
    for fact in ("Quorum queues, not classic queues", "QUEUE_TYPE=quorum", "4.0"):
        assert fact in note
    # The worker's URL (and KEDA's) points at the Service the operator creates.
    assert f"@{cluster['metadata']['name']}." in secret_env()["AMQP_URL"]


def test_compose_runs_one_broker_node_with_classic_queues() -> None:
    """One node (development): classic queues, strict priorities, the default type."""
    services = compose()["services"]
    assert "replicas" not in services["rabbitmq"].get("deploy", {})
    worker = services["worker"]
    assert "AMQP_AGENTS_TOPOLOGY__QUEUE_TYPE" not in worker["environment"]
    example = parse_env_file(ENV_EXAMPLE)  # the worker's env_file
    assert example["AMQP_AGENTS_TOPOLOGY__QUEUE_TYPE"] == QueueType.CLASSIC.value


def test_metric_names_in_the_kit_exist() -> None:
    """Every amqp_agents_* name in deploy/k8s, deploy/README.md and the alert rules is one
    the library exports."""
    exported = Metrics.names()
    sources = [*manifest_files(), DEPLOY / "README.md", DEPLOY / "prometheus" / "alerts.yml"]
    for path in sources:
        for name in re.findall(r"\bamqp_agents_[a-z0-9_]+", path.read_text()):
            assert name in exported, f"{path.name}: {name} is not exported"


def test_readme_points_at_the_prometheus_rule_manifest() -> None:
    """deploy/README.md tells operator users where the rules are (the manifest itself is
    checked against alerts.yml by tests/unit/test_alert_rules.py)."""
    readme = (DEPLOY / "README.md").read_text()
    assert "prometheusrule.yaml" in readme
    assert manifest("PrometheusRule")["spec"]["groups"], "no alert groups"


# -- Dockerfile and .dockerignore --------------------------------------------------------

DOCKERFILE_INSTRUCTIONS = frozenset(
    {
        "FROM",
        "RUN",
        "CMD",
        "LABEL",
        "EXPOSE",
        "ENV",
        "ADD",
        "COPY",
        "ENTRYPOINT",
        "VOLUME",
        "USER",
        "WORKDIR",
        "ARG",
        "ONBUILD",
        "STOPSIGNAL",
        "HEALTHCHECK",
        "SHELL",
    }
)


def dockerfile_uid() -> int:
    """The numeric uid the final stage runs as."""
    users = [args for keyword, args in dockerfile_stages()[-1] if keyword == "USER"]
    return int(users[-1].split(":")[0])


def test_dockerfile_uses_known_instructions_and_a_slim_python_311_base() -> None:
    """Every instruction is a Dockerfile instruction; every stage is python 3.11 slim."""
    text = DOCKERFILE.read_text()
    instructions = parse_dockerfile(text)
    assert {keyword for keyword, _ in instructions} <= DOCKERFILE_INSTRUCTIONS
    assert instructions[0][0] in {"ARG", "FROM"}
    args = dict(arguments.split("=", 1) for keyword, arguments in instructions if keyword == "ARG")
    for stage in dockerfile_stages():
        base = stage[0][1].split()[0]
        base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", base), base


def test_dockerfile_final_stage_runs_unprivileged_and_probes_itself() -> None:
    """Final stage: a numeric non-root USER before ENTRYPOINT, EXPOSE 9100, a HEALTHCHECK
    that asks /healthz with python, PYTHONUNBUFFERED set."""
    stage = dockerfile_stages()[-1]
    keywords = [keyword for keyword, _ in stage]
    assert "USER" in keywords
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    assert dockerfile_uid() >= 1000  # numeric and not root: runAsNonRoot can check it
    assert [args for keyword, args in stage if keyword == "EXPOSE"] == [str(METRICS_PORT)]
    [healthcheck] = [args for keyword, args in stage if keyword == "HEALTHCHECK"]
    options, _, command = healthcheck.partition("CMD ")
    probe = exec_form(command)
    assert probe[0] == "python"
    assert "127.0.0.1:%d/healthz" in probe[-1]
    assert "os.environ['AMQP_AGENTS_METRICS__PORT']" in probe[-1]
    assert "--timeout" in options
    assert "--interval" in options
    env = dockerfile_env()
    assert env["AMQP_AGENTS_METRICS__PORT"] == str(METRICS_PORT)
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"


def test_dockerfile_entrypoint_and_cmd_match_the_deployment() -> None:
    """ENTRYPOINT = the Deployment's command; CMD = its `run` without global options (the
    image takes the metrics port from AMQP_AGENTS_METRICS__PORT, the Deployment from
    --metrics-port: the same port)."""
    stage = dockerfile_stages()[-1]
    [entrypoint] = [exec_form(args) for keyword, args in stage if keyword == "ENTRYPOINT"]
    [cmd] = [exec_form(args) for keyword, args in stage if keyword == "CMD"]
    container = worker_container()
    assert entrypoint == container["command"] == ["amqp-agents"]
    assert cmd == ["run", EXAMPLE_APP]
    args = container["args"]
    assert args[args.index("run") : args.index("run") + 2] == cmd


def test_dockerfile_installs_the_package_from_the_copied_sources() -> None:
    """It copies pyproject.toml, README.md, LICENSE and amqp_agents/ (all present) and
    pip-installs them with the speed and redis extras; the runtime stage's working
    directory holds no sources."""
    build = dockerfile_stages()[0]
    copied = [args.split()[:-1] for keyword, args in build if keyword == "COPY"]
    sources = {source for group in copied for source in group}
    assert sources == {"pyproject.toml", "README.md", "LICENSE", "amqp_agents/"}
    for source in sources:
        assert (ROOT / source).exists(), source
    runs = " ".join(args for keyword, args in build if keyword == "RUN")
    assert re.search(r'pip wheel .*\s"\.\[speed,redis\]"$', runs), runs
    final = dockerfile_stages()[-1]
    assert not [args for keyword, args in final if keyword == "COPY"]
    runs = " ".join(args for keyword, args in final if keyword == "RUN")
    assert "pip install" in runs
    assert '"amqp-agents[speed,redis]"' in runs


def test_dockerfile_healthcheck_follows_the_metrics_port_setting(tmp_path: Path) -> None:
    """The HEALTHCHECK's command, run as the image would, passes against a worker serving
    on AMQP_AGENTS_METRICS__PORT (any port, not only 9100) and fails on another port."""
    [healthcheck] = [args for keyword, args in dockerfile_stages()[-1] if keyword == "HEALTHCHECK"]
    probe = exec_form(healthcheck.partition("CMD ")[2])
    port = free_port()
    env = cli_env(AMQP_URL="memory://", AMQP_AGENTS_METRICS__PORT=str(port))
    worker = CliProcess(["run", EXAMPLE_APP], env=env, log_dir=tmp_path)
    try:
        wait_until_sync(
            lambda: "serving /metrics" in worker.output(), timeout_s=20, what="the probes"
        )
        command = [sys.executable, *probe[1:]]
        ok = subprocess.run(command, env=env, capture_output=True, timeout=20, check=False)
        wrong = {**env, "AMQP_AGENTS_METRICS__PORT": str(free_port())}
        refused = subprocess.run(command, env=wrong, capture_output=True, timeout=20, check=False)
    finally:
        worker.terminate()
        worker.wait(15)
        worker.close()
    assert ok.returncode == 0, ok.stderr
    assert refused.returncode == 1


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` out of the build context (last matching pattern
    wins; a pattern that matches a directory covers what is inside it)."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = (pattern[1:] if negated else pattern).strip("/")
        regex = (
            re.escape(body)
            .replace(r"\*\*", "\0")
            .replace(r"\*", "[^/]*")
            .replace(r"\?", "[^/]")
            .replace(r"\[", "[")
            .replace(r"\]", "]")
            .replace("\0/", "(.*/)?")
            .replace("/\0", "(/.*)?")
            .replace("\0", ".*")
        )
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            ignored = not negated
    return ignored


def test_dockerignore_lets_in_only_what_the_image_needs() -> None:
    """.dockerignore keeps the COPY sources in, and .venv, caches, .git, env files out."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    needed = ["pyproject.toml", "README.md", "LICENSE", "amqp_agents/__init__.py"]
    needed += [str(p.relative_to(ROOT)) for p in (ROOT / "amqp_agents").rglob("*.py")]
    for path in needed:
        assert not dockerignored(path, patterns), f"{path} would be missing from the image"
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "amqp_agents/__pycache__/cli.cpython-311.pyc",
        "config/amqp-agents.env.example",
        ".env",
        "tests/conftest.py",
        "deploy/Dockerfile",
    ):
        assert dockerignored(path, patterns), f"{path} would be sent to the daemon"


# -- docker-compose -----------------------------------------------------------------------


def compose() -> dict[str, Any]:
    """deploy/docker-compose.yml."""
    [doc] = load_yaml_documents(COMPOSE)
    return doc


def test_compose_has_broker_worker_prometheus_and_grafana() -> None:
    """Five services; a pinned RabbitMQ 4.0 with management and the prometheus plugin."""
    services = compose()["services"]
    assert set(services) == {"rabbitmq", "redis", "worker", "prometheus", "grafana"}
    assert services["rabbitmq"]["image"] == "rabbitmq:4.0.5-management"
    volumes = (volume.split(":") for volume in services["rabbitmq"]["volumes"])
    source_of = {target: source for source, target, *_ in volumes}
    plugins = (DEPLOY / source_of["/etc/rabbitmq/enabled_plugins"]).read_text()
    assert re.fullmatch(r"\[([a-z_]+,)*[a-z_]+\]\.\n", plugins), plugins
    assert {"rabbitmq_management", "rabbitmq_prometheus"} <= set(plugins[1:-3].split(","))


def test_compose_references_existing_files() -> None:
    """Build context, Dockerfile, env files and every bind mount exist (relative to deploy/)."""
    services = compose()["services"]
    build = services["worker"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    for env_file in services["worker"]["env_file"]:
        assert (DEPLOY / env_file).resolve() == ENV_EXAMPLE
    named_volumes = set(compose().get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source in named_volumes:
                continue
            assert source.startswith("."), f"{name}: {source} is neither a path nor a volume"
            assert (DEPLOY / source).exists(), f"{name} mounts {source}, which does not exist"


def test_compose_worker_settings_and_stop_period() -> None:
    """The worker's env names are settings, its URL points at the rabbitmq service, its
    stop grace period exceeds the worker's, its port is published."""
    services = compose()["services"]
    worker = services["worker"]
    environment = worker["environment"]
    assert set(environment) <= settings_env_names() | example_app_env_names()
    assert environment["AMQP_AGENTS_METRICS__PORT"] == str(METRICS_PORT)
    url = environment["AMQP_URL"]
    assert "@rabbitmq:5672/" in url
    user = services["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_USER"]
    password = services["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_PASS"]
    assert url.startswith(f"amqp://{user}:{password}@")
    assert worker["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    grace_s = float(parse_env_file(ENV_EXAMPLE)["AMQP_AGENTS_WORKER__GRACE_PERIOD_S"])
    assert float(worker["stop_grace_period"].removesuffix("s")) > grace_s
    assert f"127.0.0.1:{METRICS_PORT}:{METRICS_PORT}" in worker["ports"]
    assert "command" not in worker  # the image's default command


def test_compose_pins_every_image() -> None:
    """Every pulled image names an exact version: no `latest`, no bare or major-only tag
    (the worker's image is built from the sources)."""
    for name, service in compose()["services"].items():
        if "build" in service:
            continue
        image = service["image"]
        _repository, _, tag = image.rpartition(":")
        assert re.match(r"v?\d+\.\d+\.\d+", tag), f"{name}: {image} is not pinned"


def test_compose_worker_shares_the_redis_task_store() -> None:
    """The worker's TASKS_STORE_URL names the redis service, which it waits for."""
    services = compose()["services"]
    worker = services["worker"]
    store = TaskStoreSettings(store_url=worker["environment"]["TASKS_STORE_URL"]).store_url
    assert store.startswith("redis://redis:6379/")
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "redis-cli" in services["redis"]["healthcheck"]["test"]


def test_prometheus_scrapes_the_compose_worker() -> None:
    """deploy/prometheus/prometheus.yml targets the compose worker on the metrics port."""
    [config] = load_yaml_documents(DEPLOY / "prometheus" / "prometheus.yml")
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    assert f"worker:{METRICS_PORT}" in targets
    assert "worker" in compose()["services"]


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards() -> None:
    """The data source is the compose Prometheus; the dashboard provider reads the directory
    where compose mounts deploy/grafana, which holds the dashboard JSON."""
    grafana = compose()["services"]["grafana"]
    mounts = {target: source for source, target, *_ in (v.split(":") for v in grafana["volumes"])}
    provisioning = DEPLOY / mounts["/etc/grafana/provisioning"]
    [datasources] = load_yaml_documents(provisioning / "datasources" / "prometheus.yml")
    [source] = datasources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert source["isDefault"] is True
    [providers] = load_yaml_documents(provisioning / "dashboards" / "amqp-agents.yml")
    [provider] = providers["providers"]
    path = provider["options"]["path"]
    assert path == "/var/lib/grafana/dashboards"
    dashboards = DEPLOY / mounts[path]
    assert dashboards.resolve() == (DEPLOY / "grafana").resolve()
    assert list(dashboards.glob("*.json")), "no dashboard to provision"
    assert "prometheus" in compose()["services"]


# -- --config FILE ---------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def concurrency_limit(worker: CliProcess, port: int, *, timeout_s: float = 15) -> float:
    """The amqp_agents_concurrency_limit a running worker exports (its effective
    worker.concurrency)."""

    def exported() -> float:
        worker.running()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as page:
                text = page.read().decode()
        except (urllib.error.URLError, ConnectionError):
            return 0.0
        found = re.search(r"^amqp_agents_concurrency_limit ([0-9.e+]+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    return wait_until_sync(
        exported,
        timeout_s=timeout_s,
        interval_s=0.1,
        what=lambda: f"a concurrency limit on :{port}/metrics:\n{worker.output()}",
    )


def run_with_config(
    config: Path, tmp_path: Path, *extra: str, **env: str
) -> tuple[float, CliProcess]:
    """Run the example app on memory:// with ``--config``; its effective concurrency."""
    port = free_port()
    worker = CliProcess(
        [
            "--config",
            str(config),
            "--url",
            "memory://",
            "run",
            EXAMPLE_APP,
            "--metrics-port",
            str(port),
            *extra,
        ],
        env={**cli_env(), **env},
        log_dir=tmp_path,
    )
    try:
        return concurrency_limit(worker, port), worker
    except BaseException:
        worker.close()
        raise


def stop(worker: CliProcess) -> int:
    """SIGTERM, then the exit code (bounded)."""
    try:
        worker.proc.send_signal(signal.SIGTERM)
        return worker.wait(15)
    finally:
        worker.close()


def test_config_file_is_read_and_env_and_options_override_it(tmp_path: Path) -> None:
    """--config FILE: the file's value applies; an env var beats it; an option beats both."""
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"worker": {"concurrency": 7, "grace_period_s": 5}}))

    limit, worker = run_with_config(config, tmp_path)
    assert (limit, stop(worker)) == (7, 0)

    limit, worker = run_with_config(config, tmp_path, AMQP_AGENTS_WORKER__CONCURRENCY="5")
    assert (limit, stop(worker)) == (5, 0)

    limit, worker = run_with_config(
        config, tmp_path, "--concurrency", "3", AMQP_AGENTS_WORKER__CONCURRENCY="5"
    )
    assert (limit, stop(worker)) == (3, 0)


def test_example_settings_file_runs_a_worker(tmp_path: Path) -> None:
    """config/settings.example.json works as it is: the default concurrency, 16."""
    limit, worker = run_with_config(JSON_EXAMPLE, tmp_path)
    assert (limit, stop(worker)) == (16, 0)


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ('{"worker": {"concurrency": 0}}', "worker.concurrency"),
        ('{"worker": {"retry": {"max_deliveries": "many"}}}', "worker.retry.max_deliveries"),
        ('{"wroker": {"concurrency": 4}}', "wroker"),
        ('{"worker": {"concurency": 4}}', "worker.concurency"),
    ],
    ids=["out-of-range", "nested-type", "unknown-group", "unknown-setting"],
)
def test_invalid_setting_in_the_config_file_fails_at_start_naming_it(
    tmp_path: Path, content: str, named: str
) -> None:
    """An invalid or unknown setting in the file: exit 2 at start, the setting named."""
    config = tmp_path / "settings.json"
    config.write_text(content)
    done = run_cli("--config", str(config), "--url", "memory://", "queues", "x", env=cli_env())
    assert done.returncode == 2, done.stderr
    assert "configuration error" in done.stderr
    assert re.search(rf"(^|\s){re.escape(named)}(:|\s|$)", done.stderr, re.M), done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "no settings file"),
        ("{not json", "cannot read"),
        pytest.param("[1, 2]", "cannot read"),
    ],
    ids=["missing", "malformed", "not-an-object"],
)
def test_unusable_config_file_fails_at_start_naming_the_file(
    tmp_path: Path, content: str | None, says: str
) -> None:
    """A missing, malformed or non-object file: exit 2 with the file's path and the reason."""
    config = tmp_path / "settings.json"
    if content is not None:
        config.write_text(content)
    done = run_cli("--config", str(config), "--url", "memory://", "queues", "x", env=cli_env())
    assert done.returncode == 2, done.stderr
    assert str(config) in done.stderr, done.stderr
    assert says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
