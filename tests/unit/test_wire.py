"""The wire codec: requests and replies to and from AMQP envelopes."""

import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from amqp_agents.errors import InvalidPayloadError, MessageTooLargeError
from amqp_agents.models.envelope import Envelope
from amqp_agents.models.messages import AgentResponse, ErrorCode, Priority
from amqp_agents.models.topology import (
    CONTENT_TYPE_JSON,
    HEADER_DEADLINE,
    MAX_PRIORITY,
    Topology,
    check_name,
)
from amqp_agents.models.wire import (
    deadline_from,
    decode_reply,
    decode_request,
    dump_json,
    encode_reply,
    encode_request,
)

# No example database: the unit suite must not write files into the work tree.
property_settings = settings(database=None, max_examples=100, deadline=None)


def _request(body: bytes = b"{}", **overrides: Any) -> Envelope:
    """An encoded request for agent 'agent', action 'act', with test defaults."""
    options: dict[str, Any] = {
        "message_id": "m-1",
        "correlation_id": "c-1",
        "reply_to": "replies.q",
        "priority": int(Priority.HIGH),
        "timeout_s": 2.5,
        "max_bytes": 1024,
    }
    options.update(overrides)
    return encode_request(Topology(), "agent", "act", body, **options)


def _delivery(body: bytes = b"{}", **fields: Any) -> Envelope:
    """A delivered request envelope with a JSON content type and action 'act'."""
    fields.setdefault("type", "act")
    fields.setdefault("content_type", CONTENT_TYPE_JSON)
    return Envelope(body=body, **fields)


# -- encode_request ---------------------------------------------------------------


def test_encode_request_sets_properties() -> None:
    """Every AMQP property of a request comes from the arguments and the topology."""
    before = time.time()
    envelope = _request(b'{"a":1}')
    after = time.time()

    assert envelope.body == b'{"a":1}'
    assert envelope.exchange == "agents"
    assert envelope.routing_key == "agent"
    assert envelope.type == "act"
    assert envelope.message_id == "m-1"
    assert envelope.correlation_id == "c-1"
    assert envelope.reply_to == "replies.q"
    assert envelope.priority == 7
    assert envelope.content_type == "application/json"
    assert envelope.persistent is True
    assert envelope.timestamp is not None
    assert int(before) <= envelope.timestamp <= after


def test_encode_request_timeout_sets_ttl_and_deadline_consistently() -> None:
    """timeout_s becomes the TTL in ms and an x-deadline of now + timeout_s in epoch ms."""
    before = time.time()
    envelope = _request(timeout_s=2.5)
    after = time.time()

    assert envelope.expiration_ms == 2500
    assert envelope.headers is not None
    deadline_ms = envelope.headers[HEADER_DEADLINE]
    assert isinstance(deadline_ms, int)
    assert int((before + 2.5) * 1000) <= deadline_ms <= int((after + 2.5) * 1000)
    assert deadline_from(envelope) == pytest.approx(deadline_ms / 1000)


def test_encode_request_without_timeout_has_no_ttl_or_deadline() -> None:
    """timeout_s=None leaves both TTL and deadline header unset."""
    envelope = _request(timeout_s=None)

    assert envelope.expiration_ms is None
    assert envelope.headers is None
    assert deadline_from(envelope) is None


def test_encode_request_tiny_timeout_keeps_a_positive_ttl() -> None:
    """A sub-millisecond timeout still yields a TTL of 1 ms, never 0 (which means 'now')."""
    assert _request(timeout_s=0.0001).expiration_ms == 1


def test_encode_request_over_max_bytes_raises() -> None:
    """A body one byte over max_bytes raises MessageTooLargeError; exactly max_bytes passes."""
    assert _request(b"x" * 16, max_bytes=16).body == b"x" * 16
    with pytest.raises(MessageTooLargeError, match="17 bytes, over the 16-byte limit"):
        _request(b"x" * 17, max_bytes=16)


def test_request_round_trip() -> None:
    """decode_request(encode_request(...)) gives back the action, payload and properties."""
    envelope = _request(b'{"title": "write docs"}', timeout_s=5)

    message = decode_request(envelope)

    assert message.action == "act"
    assert message.payload == {"title": "write docs"}
    assert message.id == "m-1"
    assert message.correlation_id == "c-1"
    assert message.reply_to == "replies.q"
    assert message.priority == Priority.HIGH
    assert message.deadline is not None
    assert envelope.headers is not None
    deadline_ms = envelope.headers[HEADER_DEADLINE]
    assert isinstance(deadline_ms, int)
    assert message.deadline.timestamp() == pytest.approx(deadline_ms / 1000)


# -- decode_request ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("envelope", "message"),
    [
        (_delivery(b"{not json"), "body is not valid JSON"),
        (_delivery(b"[1, 2]"), "body must be a JSON object, got list"),
        (_delivery(b'"text"'), "body must be a JSON object, got str"),
        (_delivery(b"42"), "body must be a JSON object, got int"),
        (_delivery(b"null"), "body must be a JSON object, got NoneType"),
        (_delivery(b"\xff\xfe"), "body is not valid JSON"),
        (_delivery(b"{}", content_type="text/plain"), "content type 'text/plain' is not supported"),
        (_delivery(b"{}", type=None), "no 'type' property naming the action"),
        (_delivery(b"{}", type=""), "no 'type' property naming the action"),
    ],
    ids=[
        "malformed",
        "array",
        "string",
        "number",
        "null",
        "not-utf8",
        "wrong-content-type",
        "no-type",
        "empty-type",
    ],
)
def test_decode_request_rejects_bad_requests(envelope: Envelope, message: str) -> None:
    """Each kind of bad request raises InvalidPayloadError with a message naming the problem."""
    with pytest.raises(InvalidPayloadError) as caught:
        decode_request(envelope)

    assert message in caught.value.message
    assert caught.value.code == ErrorCode.INVALID_PAYLOAD


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", None, ""]
)
def test_decode_request_accepts_json_content_types(content_type: str | None) -> None:
    """JSON with parameters, or no content type at all, is accepted."""
    message = decode_request(_delivery(b'{"a": 1}', content_type=content_type))

    assert message.payload == {"a": 1}


def test_decode_request_content_type_is_case_insensitive() -> None:
    """'Application/JSON' is the same media type as 'application/json'."""
    assert decode_request(_delivery(b"{}", content_type="Application/JSON")).payload == {}


def test_decode_request_empty_body_is_empty_object() -> None:
    """An empty body decodes to an empty payload."""
    assert decode_request(_delivery(b"")).payload == {}


@pytest.mark.parametrize(
    ("sent", "decoded"),
    [(None, Priority.LOWEST), (0, Priority.LOWEST), (9, Priority.CRITICAL), (10, 9), (255, 9)],
)
def test_decode_request_clamps_priority(sent: int | None, decoded: int) -> None:
    """A missing priority counts as 0 and anything above MAX_PRIORITY clamps to it."""
    assert decode_request(_delivery(priority=sent)).priority == decoded


@pytest.mark.parametrize("priority", [1, 3, 5, 6, 8])
def test_decode_request_accepts_every_contract_priority(priority: int) -> None:
    """Every AMQP priority 0-9 (which RpcClient and other clients send) decodes, unchanged."""
    assert int(decode_request(_delivery(priority=priority)).priority) == priority


def test_decode_request_ignores_bad_deadline_headers() -> None:
    """A deadline header that is absent, non-integer, boolean or non-positive is ignored."""
    for value in (None, "soon", 1.5, True, 0, -5):
        message = decode_request(_delivery(headers={HEADER_DEADLINE: value}))
        assert message.deadline is None


def test_decode_request_ignores_an_out_of_range_deadline() -> None:
    """A deadline header beyond datetime's range is ignored like any bad one, not a crash."""
    message = decode_request(_delivery(headers={HEADER_DEADLINE: 10**18}))

    assert message.deadline is None
    assert message.payload == {}


def test_decode_request_reads_an_out_of_range_timestamp_as_now() -> None:
    """A timestamp property beyond datetime's range means "now", like an absent one."""
    before = datetime.now(UTC)

    message = decode_request(_delivery(timestamp=10**15))

    assert before <= message.created_at <= datetime.now(UTC)
    assert message.payload == {}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)
bodies = st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode())
content_types = (
    st.none()
    | st.text(max_size=40)
    | st.sampled_from(
        ["application/json", "application/json; charset=utf-8", "text/plain", ";", " "]
    )
)
actions = st.none() | st.text(max_size=40)


@property_settings
@given(body=bodies, content_type=content_types, action=actions)
def test_decode_request_only_raises_invalid_payload(
    body: bytes, content_type: str | None, action: str | None
) -> None:
    """Arbitrary bodies, content types and types either decode to an object or raise
    InvalidPayloadError, never anything else."""
    envelope = Envelope(body=body, content_type=content_type, type=action)
    try:
        message = decode_request(envelope)
    except InvalidPayloadError:
        return
    assert isinstance(message.payload, dict)
    assert message.action == action


# -- replies ----------------------------------------------------------------------


def test_encode_reply_ok_body_shape() -> None:
    """An ok reply's body is exactly {"ok":true,"data":...} on the default exchange."""
    envelope = encode_reply(AgentResponse.success({"id": 1}), "replies.q", "c-9")

    assert json.loads(envelope.body) == {"ok": True, "data": {"id": 1}}
    assert envelope.body == b'{"ok":true,"data":{"id":1}}'
    assert envelope.exchange == ""
    assert envelope.routing_key == "replies.q"
    assert envelope.correlation_id == "c-9"
    assert envelope.content_type == CONTENT_TYPE_JSON
    assert envelope.persistent is False


def test_encode_reply_ok_with_model_and_null_data() -> None:
    """Pydantic models serialise as objects, and a None result is sent as null."""

    class Out(BaseModel):
        id: int

    assert json.loads(encode_reply(AgentResponse.success(Out(id=2)), "q", None).body) == {
        "ok": True,
        "data": {"id": 2},
    }
    assert encode_reply(AgentResponse.success(), "q", None).body == b'{"ok":true,"data":null}'


def test_encode_reply_error_body_shape_without_details() -> None:
    """A failed reply without details is exactly {"ok":false,"error":{"code","message"}}."""
    envelope = encode_reply(AgentResponse.failure("NOT_FOUND", "gone"), "q", "c")

    assert json.loads(envelope.body) == {
        "ok": False,
        "error": {"code": "NOT_FOUND", "message": "gone"},
    }


def test_encode_reply_error_body_includes_details_when_present() -> None:
    """Details, including nulls inside them, are sent verbatim when present."""
    details = [{"loc": ["title"], "msg": "required", "input": None}]
    envelope = encode_reply(
        AgentResponse.failure("INVALID_PAYLOAD", "bad", details=details), "q", "c"
    )

    assert json.loads(envelope.body) == {
        "ok": False,
        "error": {"code": "INVALID_PAYLOAD", "message": "bad", "details": details},
    }


def test_encode_reply_error_with_unserialisable_details_raises_invalid_payload() -> None:
    """Both branches of encode_reply report an unserialisable body the same way."""
    with pytest.raises(InvalidPayloadError):
        encode_reply(AgentResponse.failure("X", "m", details=object()), "q", "c")


@pytest.mark.parametrize(
    "response",
    [
        AgentResponse.success({"tasks": [1, 2]}),
        AgentResponse.success(None),
        AgentResponse.failure("NOT_FOUND", "gone"),
        AgentResponse.failure("CUSTOM", "m", details={"field": ["x"]}),
    ],
    ids=["ok", "ok-null", "error", "error-details"],
)
def test_reply_round_trip(response: AgentResponse) -> None:
    """decode_reply(encode_reply(r)) equals r, with the correlation id from the property."""
    decoded = decode_reply(encode_reply(response, "q", "c-7"))

    assert decoded.ok is response.ok
    assert decoded.data == response.data
    assert decoded.error == response.error
    assert decoded.correlation_id == "c-7"


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b'{"data": 1}', b'{"ok": true, "error": {"code": "X", "message": "m"}}'],
    ids=["not-json", "array", "no-ok", "ok-with-error"],
)
def test_malformed_reply_decodes_to_internal_error(body: bytes) -> None:
    """A reply body that is not a valid reply becomes an INTERNAL_ERROR reply, not a raise."""
    decoded = decode_reply(Envelope(body=body, correlation_id="c-3"))

    assert decoded.ok is False
    assert decoded.code == ErrorCode.INTERNAL_ERROR
    assert decoded.error is not None
    assert "malformed reply" in decoded.error.message
    assert decoded.correlation_id == "c-3"


@property_settings
@given(body=bodies)
def test_decode_reply_never_raises(body: bytes) -> None:
    """Any reply body decodes to a valid reply object."""
    decoded = decode_reply(Envelope(body=body))

    assert decoded.ok is (decoded.error is None)


# -- names, JSON, topology --------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "task_manager", "Agent.v2-beta", "9lives", "x" * 200])
def test_check_name_accepts(name: str) -> None:
    """Names of letters, digits, '_', '.', '-' starting with a letter or digit pass."""
    assert check_name("agent", name) == name


@pytest.mark.parametrize(
    "name", ["", "-x", ".x", "_x", "has space", "a/b", "a#b", "a*", "émile", "x" * 201]
)
def test_check_name_rejects(name: str) -> None:
    """Empty, oddly-started, over-long or wildcard-bearing names raise with the kind in the text."""
    with pytest.raises(ValueError, match="invalid action name"):
        check_name("action", name)


def test_check_name_rejects_trailing_newline() -> None:
    """A name ending in a newline is not a valid routing key or queue name."""
    with pytest.raises(ValueError, match="invalid agent name"):
        check_name("agent", "task_manager\n")


def test_dump_json_is_compact() -> None:
    """dump_json writes compact JSON for plain values and models."""

    class Item(BaseModel):
        at: datetime

    assert dump_json({"a": [1, 2]}) == b'{"a":[1,2]}'
    moment = datetime(2024, 1, 2, tzinfo=UTC)
    assert dump_json(Item(at=moment)) == b'{"at":"2024-01-02T00:00:00Z"}'


def test_dump_json_rejects_unserialisable() -> None:
    """A value JSON cannot represent raises InvalidPayloadError, not a pydantic error."""
    with pytest.raises(InvalidPayloadError, match="not JSON-serialisable"):
        dump_json({"x": object()})


def test_topology_names() -> None:
    """An agent's queue is the prefix plus its name; 'amq.' exchanges are refused."""
    assert Topology().agent_queue("tasks") == "agents.tasks"
    assert Topology(queue_prefix="svc.").agent_queue("tasks") == "svc.tasks"
    with pytest.raises(ValueError, match="reserved"):
        Topology(requests_exchange="amq.direct")


def test_max_priority_matches_default_topology() -> None:
    """Agent queues are declared with the contract's highest priority by default."""
    assert Topology().max_priority == MAX_PRIORITY == 9
