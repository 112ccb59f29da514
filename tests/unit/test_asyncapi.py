"""The AsyncAPI document: valid against the official AsyncAPI 3.0 JSON Schema, complete,
and saying what the topology and the handlers say.

The official schema is the npm package ``@asyncapi/specs`` (pinned, checked against its
sha512), fetched into a cache outside the repository by ``scripts/asyncapi-schema``,
which these tests run: when it cannot be had, they fail, never skip.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from jsonschema.protocols import Validator as Official

from amqp_agents.cli import main
from amqp_agents.contract.asyncapi import asyncapi_document
from amqp_agents.errors import ConfigurationError, ErrorCode
from amqp_agents.events.publisher import RecordingPublisher
from amqp_agents.examples.tasks import AuditAgent, TaskAdd, TaskManager, TaskRef, app
from amqp_agents.models.topology import ACTION_DESCRIBE, QueueType, Topology
from amqp_agents.runtime.agent import Agent, action, on_event

SCRIPT = Path(__file__).parents[2] / "scripts" / "asyncapi-schema"
URL = "amqp://guest:hunter2@rabbit.example:5673/prod%2Feu"


@pytest.fixture(scope="module")
def official() -> Official:
    """A validator of the AsyncAPI 3.0.0 JSON Schema (draft-07) from ``@asyncapi/specs``."""
    done = subprocess.run([str(SCRIPT)], capture_output=True, text=True, check=False, timeout=50)
    assert done.returncode == 0, f"scripts/asyncapi-schema failed:\n{done.stderr}"
    schema = json.loads(Path(done.stdout.strip()).read_text(encoding="utf-8"))
    draft7 = jsonschema.Draft7Validator
    draft7.check_schema(schema)
    return draft7(schema, format_checker=draft7.FORMAT_CHECKER)


def violations(validator: Official, document: dict[str, Any]) -> list[str]:
    """What the official schema finds wrong with ``document`` (empty: valid)."""
    return [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message[:200]}"
        for error in validator.iter_errors(document)
    ]


def document(agents: list[Agent] | None = None, topology: Topology | None = None) -> dict[str, Any]:
    return asyncapi_document(
        app() if agents is None else agents,
        topology=topology or Topology(),
        broker_url=URL,
        version="1.2.3",
    )


def refs(node: Any) -> list[str]:
    """Every ``$ref`` in ``node``, at any depth."""
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [ref for value in node.values() for ref in refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in refs(value)]
    return []


def pointer(root: dict[str, Any], ref: str) -> Any:
    """What an in-document ``$ref`` (``#/a/b``) points at; ``KeyError`` if nothing."""
    assert ref.startswith("#/"), ref
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


# -- validity ------------------------------------------------------------------------


def test_the_example_app_document_is_valid_asyncapi_3(official: Official) -> None:
    """The example app's document passes the official AsyncAPI 3.0.0 JSON Schema."""
    doc = document()

    assert doc["asyncapi"] == "3.0.0"
    assert violations(official, doc) == []


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("operations", "task_manager/task_add", "reply", "address", "location"), "reply_to"),
        (("channels", "queue.task_manager", "bindings", "amqp", "is"), "routingKey"),
        (("operations", "audit/audit_log", "action"), "answer"),
    ],
    ids=["reply-address", "queue-binding", "operation-action"],
)
def test_the_official_schema_catches_a_broken_document(
    official: Official, path: tuple[str, ...], value: str
) -> None:
    """The validation has teeth: one wrong field makes the document invalid."""
    doc = document()
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value

    assert violations(official, doc) != []


def test_every_reference_resolves_inside_the_document() -> None:
    """AsyncAPI's schema only checks that a ``$ref`` is a URI: each must point at
    something in the document."""
    doc = document()
    found = refs(doc)

    assert len(found) > 20
    for ref in found:
        pointer(doc, ref)  # raises KeyError if it points at nothing


def test_a_document_of_quorum_and_odd_names_is_valid_too(official: Official) -> None:
    """Quorum queues, names with dots and dashes, a broadcast handler, no events."""

    class Odd(Agent):
        name = "odd.agent-1"

        @action("do.it-now")
        async def do(self, payload: dict[str, Any]) -> list[int]:
            return []

        @on_event("x.#", broadcast=True)
        async def seen(self) -> None:
            """Anything under x."""

    doc = document([Odd()], Topology(queue_type=QueueType.QUORUM))

    assert violations(official, doc) == []
    for ref in refs(doc):
        pointer(doc, ref)


# -- completeness --------------------------------------------------------------------


def test_the_document_lists_every_action_and_event_of_the_app() -> None:
    """Read from the agents themselves: every action (and ``$describe``) is a receive
    operation with a reply, every handler's pattern is bound, every declared event is
    sent, and nothing else is there."""
    agents = app()
    doc = document(agents)
    operations = doc["operations"]

    expected_actions = {
        (agent.name, name) for agent in agents for name in [*agent.actions(), ACTION_DESCRIBE]
    }
    actions = {tuple(key.split("/")) for key, op in operations.items() if "reply" in op}
    assert actions == expected_actions
    expected_patterns = sorted(
        (agent.name, spec.pattern) for agent in agents for spec, _ in agent.event_handlers()
    )
    patterns = sorted(
        (key.split("/")[0], pointer(doc, op["messages"][0]["$ref"])["name"])
        for key, op in operations.items()
        if "/on/" in key
    )
    assert patterns == expected_patterns
    expected_events = sorted((agent.name, t) for agent in agents for t in type(agent).emits)
    events = sorted(
        (key.split("/")[0], key.split("/", 2)[2])
        for key, op in operations.items()
        if op["action"] == "send"
    )
    assert events == expected_events
    assert len(operations) == len(expected_actions) + len(patterns) + len(events)


async def test_the_example_app_emits_only_the_events_it_declares() -> None:
    """``emits`` is what the agents really publish: run every action that emits."""
    manager = TaskManager()
    manager.events = recorder = RecordingPublisher()
    task = await manager.add(TaskAdd(title="t"))
    await manager.complete(TaskRef(id=task.id))

    assert set(recorder.types()) == set(TaskManager.emits)
    assert AuditAgent.emits == {}


# -- what it says --------------------------------------------------------------------


@pytest.mark.parametrize("queue_type", list(QueueType))
def test_queue_channels_carry_the_topology_arguments(queue_type: QueueType) -> None:
    """Each agent queue channel is the queue the topology declares, arguments included."""
    topology = Topology(queue_type=queue_type)
    doc = document(topology=topology)

    binding = doc["channels"]["queue.task_manager"]["bindings"]["amqp"]
    assert binding["is"] == "queue"
    assert binding["queue"]["name"] == "agents.task_manager"
    assert binding["x-arguments"] == topology.agent_queue_spec("task_manager").arguments
    expected = (
        {"x-queue-type": "quorum"} if queue_type is QueueType.QUORUM else {"x-max-priority": 9}
    )
    assert binding["x-arguments"] == expected
    exchange = doc["channels"]["requests.task_manager"]["bindings"]["amqp"]["exchange"]
    assert (exchange["name"], exchange["type"]) == ("agents", "direct")


def test_an_action_replies_to_reply_to_with_its_data_or_an_error() -> None:
    """The reply address is ``reply_to``, the correlation id is ``correlation_id``, the
    reply is the action's data or the error reply with every error code."""
    doc = document()
    operation = doc["operations"]["task_manager/task_get"]

    assert operation["action"] == "receive"
    assert operation["reply"]["address"]["location"] == "$message.header#/reply_to"
    request = pointer(doc, operation["messages"][0]["$ref"])
    request = pointer(doc, request["$ref"])
    assert request["correlationId"]["location"] == "$message.header#/correlation_id"
    assert request["bindings"]["amqp"]["messageType"] == "task_get"
    success, failure = (pointer(doc, ref["$ref"]) for ref in operation["reply"]["messages"])
    data = pointer(doc, success["payload"]["properties"]["data"]["$ref"])
    assert data["title"] == "Task"
    error = pointer(doc, pointer(doc, failure["$ref"])["payload"]["$ref"])
    code = error["properties"]["error"]["properties"]["code"]["anyOf"][0]
    assert pointer(doc, code["$ref"])["enum"] == [code.value for code in ErrorCode]
    headers = doc["components"]["schemas"]["amqp-agents.RequestHeaders"]["properties"]
    assert {"x-deadline", "x-attempt", "reply_to", "correlation_id", "type"} <= set(headers)


def test_payload_schemas_validate_like_the_handlers() -> None:
    """A request payload schema accepts what the handler accepts and refuses the rest."""
    doc = document()
    message = doc["channels"]["requests.task_manager"]["messages"]["task_add"]
    schema = {**message["payload"], "components": doc["components"]}
    validator = jsonschema.Draft7Validator(schema)

    assert validator.is_valid({"title": "write docs"})
    assert not validator.is_valid({"title": ""})
    assert not validator.is_valid({"title": "x", "priority": 1})  # extra="forbid"


def test_the_server_has_the_host_and_vhost_but_no_credentials() -> None:
    """Only host, port and vhost of the URL reach the document."""
    doc = document()

    assert doc["servers"]["broker"]["host"] == "rabbit.example:5673"
    assert doc["channels"]["queue.audit"]["bindings"]["amqp"]["queue"]["vhost"] == "prod/eu"
    assert "hunter2" not in json.dumps(doc)


def test_duplicate_or_no_agents_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="unique"):
        document([AuditAgent(), AuditAgent()])
    with pytest.raises(ConfigurationError, match="at least one"):
        document([])


# -- the command ---------------------------------------------------------------------


def test_the_command_writes_json_or_yaml(
    official: Official, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``amqp-agents asyncapi`` writes JSON to stdout, YAML to a .yaml file: the same."""
    target = "amqp_agents.examples.tasks:app"

    assert main(["asyncapi", target]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert main(["asyncapi", target, "--output", str(tmp_path / "api.yaml")]) == 0
    written = yaml.safe_load((tmp_path / "api.yaml").read_text(encoding="utf-8"))

    assert written == printed
    assert violations(official, written) == []


def test_the_command_refuses_a_bad_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["asyncapi", "no_such_module_xyz:app"]) == 2
    assert "cannot import" in capsys.readouterr().err
