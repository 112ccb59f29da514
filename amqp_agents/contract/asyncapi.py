"""The AsyncAPI 3.0 document of a set of agents: the wire contract, for tools and people.

It describes the *agents' application* (the worker), as AsyncAPI asks: a worker
**receives** each action's request from its queue and replies, so every action is a
``receive`` operation with a ``reply`` (a client is the mirror image, and code
generators invert it); an ``@on_event`` handler is a ``receive`` from its group's
queue; a declared event (:attr:`~amqp_agents.runtime.agent.Agent.emits`) is a ``send``.

Channels (keys are unique by construction: names cannot contain ``/`` or ``$``):

* ``requests.<agent>``: the ``agents`` direct exchange, routing key ``<agent>``, where
  callers publish; it defines the request messages, one per action, told apart by
  the AMQP ``type`` property (``messageType`` in the message binding, and a ``const``
  in the headers schema);
* ``queue.<agent>``: the agent's queue, with its arguments from
  :class:`~amqp_agents.models.topology.Topology` (``x-arguments``), what the worker reads;
* ``replies.<agent>``: the caller's reply queue, whose name travels in ``reply_to``
  (address ``null``: known only at run time); one success message per action and the
  error reply (``$error``), whose ``code`` lists the library's error codes;
* ``event.<type>``: the ``events`` topic exchange, routing key = event type;
* ``group.<group>`` and ``broadcast.<agent>``: the queues event handlers read, with the
  topic patterns they are bound with (``x-bindings``).

AMQP keeps ``reply_to``, ``correlation_id``, ``type``, ``priority`` and ``expiration``
in message *properties*, not in the headers table; AsyncAPI's runtime expressions can
only point into ``header`` or ``payload``, so the headers schema lists those
properties too (each says which it is), and the reply address is
``$message.header#/reply_to``. Payload schemas come from the handlers' pydantic types
(hoisted into ``components.schemas``); pydantic writes JSON Schema 2020-12, which for
objects, arrays, unions and enums uses the keywords AsyncAPI's draft-07 based schema
format knows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote, urlsplit

from pydantic import TypeAdapter

from amqp_agents.contract.amqp import (
    BINDING_VERSION,
    ERROR_REPLY,
    REPLY_ADDRESS,
    SCHEMAS,
    common_components,
    event_message,
    exchange_binding,
    queue_binding,
    reply_message,
    request_message,
)
from amqp_agents.errors import ConfigurationError
from amqp_agents.models.topology import ACTION_DESCRIBE, CONTENT_TYPE_JSON
from amqp_agents.runtime.describe import AgentContract, Description, contract_of

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pydantic.json_schema import JsonSchemaMode

    from amqp_agents.models.topology import Topology
    from amqp_agents.runtime.agent import Agent

__all__ = ["ASYNCAPI_VERSION", "asyncapi_document", "render"]

ASYNCAPI_VERSION: Final = "3.0.0"
_ERROR: Final = "$error"
"""The error reply's key in a replies channel: ``$`` cannot start an action name."""
_EMIT_BINDING: Final = {
    "deliveryMode": 2,
    "mandatory": False,
    "timestamp": True,
    "bindingVersion": BINDING_VERSION,
}

_NO_PAYLOAD: Final = {"type": "object", "description": "No payload: the body is ignored."}

_SchemaKey = tuple[int, str, str]
"""(agent index, kind, name): one payload schema to generate."""
_DESCRIBE: Final = -1
"""The agent index of the ``$describe`` reply's schema, which every agent shares."""


@dataclass(slots=True)
class _Document:
    """The parts of the document being filled in, agent by agent."""

    topology: Topology
    vhost: str
    channels: dict[str, Any] = field(default_factory=dict)
    operations: dict[str, Any] = field(default_factory=dict)


def asyncapi_document(
    agents: Sequence[Agent], *, topology: Topology, broker_url: str, version: str
) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of ``agents`` on ``topology``, as plain JSON data.

    ``broker_url`` gives the server's host, port and vhost (never its credentials);
    ``version`` is the document's ``info.version``. Every agent also lists the reserved
    ``$describe`` action, which it answers like any other. The same agents give the
    same document (keys in declaration order).

    Raises:
        ConfigurationError: no agents, or two with the same name.
    """
    if not agents:
        raise ConfigurationError("an AsyncAPI document needs at least one agent")
    names = [agent.name for agent in agents]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"agent names must be unique, got {names}")
    contracts = [contract_of(agent) for agent in agents]
    schemas, defs = _payload_schemas(contracts)
    server, vhost = _server(broker_url)
    document = _Document(topology, vhost)
    common = common_components(topology)
    for index, contract in enumerate(contracts):
        _add_actions(document, index, contract, schemas)
        _add_emitted(document, index, contract, schemas)
        _add_subscriptions(document, index, contract, schemas)
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": f"amqp-agents: {', '.join(names)}",
            "version": version,
            "description": "Agents that answer requests and events over RabbitMQ. The"
            " wire rules (confirms, mandatory publishing, deadlines, retries, dead letters)"
            " are in docs/protocol.md of amqp-agents; a running agent also answers the"
            f" reserved action `{ACTION_DESCRIBE}` with its schemas.",
        },
        "defaultContentType": CONTENT_TYPE_JSON,
        "servers": {"broker": server},
        "channels": document.channels,
        "operations": document.operations,
        "components": {"schemas": {**defs, **common["schemas"]}, "messages": common["messages"]},
    }


def _add_actions(
    document: _Document, index: int, contract: AgentContract, schemas: dict[_SchemaKey, Any]
) -> None:
    """The agent's request, queue and reply channels, and a ``receive`` per action."""
    agent, topology = contract.agent, document.topology
    requests, queue, replies = f"requests.{agent}", f"queue.{agent}", f"replies.{agent}"
    request_messages: dict[str, Any] = {}
    reply_messages: dict[str, Any] = {_ERROR: {"$ref": "#/components/messages/" + ERROR_REPLY}}
    for spec in contract.actions:
        payload = schemas[(index, "payload", spec.name)] if spec.takes_payload else _NO_PAYLOAD
        request_messages[spec.name] = request_message(spec.name, spec.description, payload)
        reply_messages[spec.name] = reply_message(spec.name, schemas[(index, "reply", spec.name)])
    request_messages[ACTION_DESCRIBE] = request_message(
        ACTION_DESCRIBE, "Describe this agent: its actions and events, with their schemas.", {}
    )
    reply_messages[ACTION_DESCRIBE] = reply_message(
        ACTION_DESCRIBE, schemas[(_DESCRIBE, "reply", ACTION_DESCRIBE)]
    )
    exchange = topology.requests_exchange
    document.channels[requests] = {
        "address": agent,
        "title": f"Requests to {agent}",
        "description": f"Callers publish here: exchange `{exchange}`, routing key `{agent}`,"
        " mandatory, with publisher confirms.",
        "messages": request_messages,
        "bindings": {"amqp": exchange_binding(exchange, "direct", document.vhost)},
    }
    queue_spec = topology.agent_queue_spec(agent)
    document.channels[queue] = {
        "address": queue_spec.name,
        "title": f"Queue of {agent}",
        "description": f"What the workers of `{agent}` consume; bound to `{exchange}` with"
        f" routing key `{agent}`. Callers must not declare it.",
        "messages": {
            name: {"$ref": f"#/channels/{requests}/messages/{name}"} for name in request_messages
        },
        "bindings": {"amqp": queue_binding(queue_spec, document.vhost)},
    }
    document.channels[replies] = {
        "address": None,
        "title": f"Replies from {agent}",
        "description": "The caller's reply queue, named by the request's `reply_to` (a"
        " server-named exclusive queue, or `amq.rabbitmq.reply-to`); the worker publishes"
        " to it through the default exchange.",
        "messages": reply_messages,
        "bindings": {"amqp": queue_binding(topology.private_queue_spec(), document.vhost)},
    }
    for name, message in request_messages.items():
        document.operations[f"{agent}/{name}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{queue}"},
            "summary": message.get("summary", name),
            "messages": [{"$ref": f"#/channels/{queue}/messages/{name}"}],
            "reply": {
                "address": {
                    "location": REPLY_ADDRESS,
                    "description": "The request's `reply_to` property.",
                },
                "channel": {"$ref": f"#/channels/{replies}"},
                "messages": [
                    {"$ref": f"#/channels/{replies}/messages/{name}"},
                    {"$ref": f"#/channels/{replies}/messages/{_ERROR}"},
                ],
            },
            "bindings": {"amqp": {"ack": True, "bindingVersion": BINDING_VERSION}},
        }


def _add_emitted(
    document: _Document, index: int, contract: AgentContract, schemas: dict[_SchemaKey, Any]
) -> None:
    """A channel per declared event type (shared by the agents that emit it), and a
    ``send`` for each."""
    agent, exchange = contract.agent, document.topology.events_exchange
    for event in contract.emits:
        key = f"event.{event.type}"
        channel = document.channels.setdefault(
            key,
            {
                "address": event.type,
                "title": f"Event {event.type}",
                "messages": {},
                "bindings": {"amqp": exchange_binding(exchange, "topic", document.vhost)},
            },
        )
        payload = schemas[(index, "emits", event.type)]
        channel["messages"][agent] = event_message(event.type, payload, one_type=True)
        document.operations[f"{agent}/emit/{event.type}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{key}"},
            "messages": [{"$ref": f"#/channels/{key}/messages/{agent}"}],
            "bindings": {"amqp": _EMIT_BINDING},
        }


def _add_subscriptions(
    document: _Document, index: int, contract: AgentContract, schemas: dict[_SchemaKey, Any]
) -> None:
    """A channel per queue the handlers read (a group's, or a private one), with the
    patterns it is bound with, and a ``receive`` per handler and pattern."""
    agent, topology = contract.agent, document.topology
    for number, sub in enumerate(contract.subscriptions):
        if sub.group is None:
            key, spec = f"broadcast.{agent}", topology.private_queue_spec()
            title = f"Events for every process of {agent}"
        else:
            key, spec = f"group.{sub.group}", topology.group_queue_spec(sub.group)
            title = f"Events for group {sub.group}"
        binding = queue_binding(spec, document.vhost) | {"x-bindings": []}
        channel = document.channels.setdefault(
            key,
            {
                "address": spec.name or None,
                "title": title,
                "messages": {},
                "bindings": {"amqp": binding},
            },
        )
        message = f"{agent}.{number}"  # unique: the part after the last dot is a number
        payload = schemas[(index, "subscription", str(number))]
        channel["messages"][message] = event_message(sub.pattern, payload, one_type=False)
        channel["bindings"]["amqp"]["x-bindings"].append(
            {"exchange": topology.events_exchange, "routingKey": sub.pattern}
        )
        document.operations[f"{agent}/on/{number}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{key}"},
            "summary": sub.description or f"Events matching {sub.pattern}",
            "messages": [{"$ref": f"#/channels/{key}/messages/{message}"}],
            "bindings": {"amqp": {"ack": True, "bindingVersion": BINDING_VERSION}},
        }


def _payload_schemas(
    contracts: Sequence[AgentContract],
) -> tuple[dict[_SchemaKey, Any], dict[str, Any]]:
    """Every payload schema, with the models they share hoisted into
    ``components.schemas`` (pydantic names them, and tells same-named models apart)."""
    inputs: list[tuple[_SchemaKey, JsonSchemaMode, TypeAdapter[Any]]] = [
        ((_DESCRIBE, "reply", ACTION_DESCRIBE), "serialization", TypeAdapter(Description))
    ]
    for index, contract in enumerate(contracts):
        for spec in contract.actions:
            inputs.append(((index, "payload", spec.name), "validation", spec.payload))
            inputs.append(((index, "reply", spec.name), "serialization", spec.reply))
        for event in contract.emits:
            inputs.append(((index, "emits", event.type), "serialization", event.payload))
        for number, sub in enumerate(contract.subscriptions):
            inputs.append(((index, "subscription", str(number)), "validation", sub.payload))
    generated, defs = TypeAdapter.json_schemas(inputs, ref_template=SCHEMAS + "{model}")
    return {key: schema for (key, _mode), schema in generated.items()}, defs.get("$defs", {})


def _server(url: str) -> tuple[dict[str, Any], str]:
    """The server object of ``url`` (host, port and vhost: never its credentials) and
    the vhost."""
    parts = urlsplit(url)
    secure = parts.scheme == "amqps"
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"  # IPv6
    port = parts.port or (5671 if secure else 5672)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    server = {
        "host": f"{host}:{port}",
        "pathname": parts.path or "/",
        "protocol": "amqps" if secure else "amqp",
        "protocolVersion": "0.9.1",
        "description": f"RabbitMQ, vhost `{vhost}`",
    }
    return server, vhost


def render(document: dict[str, Any], *, yaml: bool = False) -> str:
    """The document as text: JSON (indented), or YAML (needs PyYAML: the ``yaml`` extra).

    Raises:
        ConfigurationError: YAML asked for without PyYAML installed.
    """
    if not yaml:
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    try:
        import yaml as pyyaml
    except ImportError:
        raise ConfigurationError(
            "writing YAML needs PyYAML: pip install 'amqp-agents[yaml]' (or write .json)"
        ) from None
    text: str = pyyaml.safe_dump(document, sort_keys=False, allow_unicode=True)
    return text
