"""The deployment kit's files, read for tests: Kubernetes manifests, the Dockerfile, paths.

Shared by ``tests/unit/test_deploy.py`` (the files agree with the code) and
``tests/integration/test_deploy_worker.py`` (the worker runs as the Deployment says).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from amqp_agents.config import Settings
from amqp_agents.examples.tasks import TaskStoreSettings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
CONFIG = ROOT / "config"
ENV_EXAMPLE = CONFIG / "amqp-agents.env.example"
JSON_EXAMPLE = CONFIG / "settings.example.json"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"

EXAMPLE_APP = "amqp_agents.examples.tasks:app"
METRICS_PORT = 9100
WORKER = "amqp-agents-worker"
"""Name of the worker's Deployment and Service (the kit also runs Redis)."""
REDIS = "amqp-agents-redis"
"""Name of the example app's Redis Deployment and Service."""


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of ``path``, each a mapping."""
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert documents, f"{path} holds no YAML document"
    for doc in documents:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
    return documents


def manifest_files() -> list[Path]:
    """The Kubernetes manifests under deploy/k8s (kustomizations excluded)."""
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    """(file, document) of every Kubernetes object in deploy/k8s."""
    return [(path, doc) for path in manifest_files() for doc in load_yaml_documents(path)]


def manifest(kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of ``kind`` (and ``name``, if given) in deploy/k8s."""
    found = [
        doc
        for _path, doc in manifests()
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def worker_container() -> dict[str, Any]:
    """The Deployment's (only) container."""
    [container] = manifest("Deployment", WORKER)["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def env_names_of(model: type[BaseModel], prefix: str) -> Iterator[str]:
    """Environment variable names of every leaf setting of ``model``, nested groups too."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from env_names_of(annotation, f"{prefix}{name.upper()}__")
        else:
            yield f"{prefix}{name.upper()}"


def settings_env_names() -> frozenset[str]:
    """Every environment variable ``Settings`` reads: AMQP_URL, AMQP_AGENTS_URL and
    ``AMQP_AGENTS_<GROUP>__<FIELD>[__<SUB>]`` for each leaf of each group.

    ``AMQP_AGENTS_CONNECTION__URL`` is left out: the URL belongs at the top level, and
    Settings refuses a connection URL that differs from it.
    """
    prefix = str(Settings.model_config.get("env_prefix", ""))
    delimiter = str(Settings.model_config.get("env_nested_delimiter", ""))
    assert (prefix, delimiter) == ("AMQP_AGENTS_", "__")
    names = {"AMQP_URL", "AMQP_AGENTS_URL"}
    for group, field in Settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names.update(env_names_of(annotation, f"{prefix}{group.upper()}{delimiter}"))
        elif group != "url":  # a top-level setting, such as event_loop
            names.add(f"{prefix}{group.upper()}")
    names.discard("AMQP_AGENTS_CONNECTION__URL")
    return frozenset(names)


def example_app_env_names() -> frozenset[str]:
    """The example app's own variables (its task store: ``TASKS_STORE_URL``, ...): the
    kit sets them beside amqp-agents' settings."""
    prefix = str(TaskStoreSettings.model_config.get("env_prefix", ""))
    return frozenset(f"{prefix}{name}".upper() for name in TaskStoreSettings.model_fields)


def configmap_env() -> dict[str, str]:
    """The ConfigMap's data: environment variables for the worker."""
    data = manifest("ConfigMap")["data"]
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values must be strings"
    return dict(data)


def secret_env() -> dict[str, str]:
    """The example Secret's stringData."""
    return dict(manifest("Secret")["stringData"])


def prestop_sleep_s(container: dict[str, Any]) -> float:
    """Seconds the preStop hook sleeps (``exec: sleep N``)."""
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    program, seconds = command
    assert program == "sleep", command
    return float(seconds)


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, arguments = full.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages (instructions from one FROM to the next)."""
    stages: list[list[tuple[str, str]]] = []
    for instruction in parse_dockerfile(DOCKERFILE.read_text()):
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def exec_form(arguments: str) -> list[str]:
    """A JSON (exec form) argument list."""
    value = json.loads(arguments)
    assert isinstance(value, list), arguments
    assert all(isinstance(v, str) for v in value), arguments
    return value


def dockerfile_env() -> dict[str, str]:
    """The ``ENV`` variables of the Dockerfile's final stage (``KEY=value`` form only)."""
    env: dict[str, str] = {}
    for keyword, arguments in dockerfile_stages()[-1]:
        if keyword == "ENV":
            for pair in arguments.split():
                key, sep, value = pair.partition("=")
                assert sep, f"ENV {arguments!r}: use the KEY=value form"
                env[key] = value
    return env
