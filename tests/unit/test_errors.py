"""The exception tree: wire codes, round trips, builtin mixins and the drawn tree."""

import re
from dataclasses import dataclass

import pytest

from amqp_agents import errors
from amqp_agents.errors import (
    ActionTimeoutError,
    AgentError,
    AmqpAgentsError,
    BrokerUnavailableError,
    ConfigurationError,
    ConnectionLostError,
    InvalidPayloadError,
    LifecycleError,
    MessageTooLargeError,
    NotFoundError,
    PublishTimeoutError,
    QueueNotFoundError,
    UnroutableError,
)
from amqp_agents.models.messages import AgentResponse, ErrorCode, ErrorInfo

EXPORTED = {name: getattr(errors, name) for name in errors.__all__}
# The classes that own a wire code (Retry refines RetryableError and shares its code).
AGENT_ERRORS = sorted(
    (
        kind
        for kind in EXPORTED.values()
        if issubclass(kind, AgentError) and kind is not AgentError and "code" in vars(kind)
    ),
    key=lambda kind: kind.__name__,
)
BUILTIN_MIXINS = (
    ValueError,
    RuntimeError,
    ConnectionError,
    TimeoutError,
    LookupError,
    PermissionError,
)


def test_every_agent_error_has_a_distinct_error_code() -> None:
    """Each AgentError subclass owns one ErrorCode, and every ErrorCode has its class."""
    codes = [kind.code for kind in AGENT_ERRORS]

    assert all(isinstance(code, ErrorCode) for code in codes)
    assert len(set(codes)) == len(codes)
    assert set(codes) == set(ErrorCode)


@pytest.mark.parametrize("kind", AGENT_ERRORS, ids=lambda kind: kind.__name__)
def test_agent_error_round_trips_through_a_reply(kind: type[AgentError]) -> None:
    """AgentResponse.from_error() then from_info() rebuilds the same class, message and details."""
    response = AgentResponse.from_error(
        kind("it broke", details={"field": "title"}), correlation_id="c"
    )
    assert response.ok is False
    assert response.code == kind.code
    assert response.correlation_id == "c"
    assert response.error is not None

    rebuilt = AgentError.from_info(response.error)

    assert type(rebuilt) is kind
    assert rebuilt.message == "it broke"
    assert rebuilt.details == {"field": "title"}


def test_agent_error_message_defaults_to_code() -> None:
    """An AgentError raised without a message uses its code as the message."""
    error = NotFoundError()

    assert error.message == "NOT_FOUND"
    assert str(error) == "NOT_FOUND"


def test_unknown_code_gives_plain_agent_error_with_that_code() -> None:
    """from_info() with a service's own code returns a plain AgentError carrying the code."""
    error = AgentError.from_info(ErrorInfo(code="QUOTA_EXCEEDED", message="slow down"))

    assert type(error) is AgentError
    assert error.code == "QUOTA_EXCEEDED"
    assert error.message == "slow down"
    assert ErrorInfo.from_error(error).code == "QUOTA_EXCEEDED"
    assert AgentError.code == ErrorCode.INTERNAL_ERROR  # the class default is untouched


@pytest.mark.parametrize(
    ("kind", "builtin"),
    [
        (ActionTimeoutError, TimeoutError),
        (NotFoundError, LookupError),
        (InvalidPayloadError, ValueError),
        (MessageTooLargeError, ValueError),
        (BrokerUnavailableError, ConnectionError),
        (ConnectionLostError, ConnectionError),
        (PublishTimeoutError, TimeoutError),
        (ConfigurationError, ValueError),
        (LifecycleError, RuntimeError),
        (QueueNotFoundError, LookupError),
    ],
)
def test_builtin_mixins(kind: type[Exception], builtin: type[Exception]) -> None:
    """Errors a caller would catch as a builtin are also that builtin."""
    assert issubclass(kind, builtin)
    assert issubclass(kind, AmqpAgentsError)


def test_every_exported_error_is_in_the_tree() -> None:
    """errors.__all__ holds exactly the AmqpAgentsError classes of the module, and the
    ErrorCode enum they carry."""
    defined = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, AmqpAgentsError)
    }
    assert set(errors.__all__) == defined | {"ErrorCode"}


def test_unroutable_error_keeps_exchange_and_key() -> None:
    """UnroutableError exposes where the publish went and says so in its text."""
    error = UnroutableError("agents", "ghost")

    assert (error.exchange, error.routing_key) == ("agents", "ghost")
    assert "'agents'" in str(error)
    assert "'ghost'" in str(error)


# -- the drawing in the module docstring ------------------------------------------


@dataclass(frozen=True)
class DrawnNode:
    """One line of the ASCII tree."""

    name: str
    parent: str | None
    mixins: frozenset[str]
    note: str


_LINE = re.compile(
    r"^(?P<indent>[ │├└─]*)(?P<name>[A-Z]\w+)(?: \((?P<mixins>[\w, ]+)\))?(?P<note>.*)$"
)


def _drawn_tree() -> dict[str, DrawnNode]:
    """Parse the tree in errors.__doc__: name -> node (parent found by indentation)."""
    assert errors.__doc__ is not None
    lines = errors.__doc__.split("::", 1)[1].split("\n\n", 2)[1].splitlines()
    stack: list[tuple[int, str]] = []
    nodes: dict[str, DrawnNode] = {}
    for line in lines:
        match = _LINE.match(line)
        assert match is not None, f"cannot parse tree line {line!r}"
        column = len(match["indent"])
        while stack and stack[-1][0] >= column:
            stack.pop()
        mixins = frozenset(m.strip() for m in (match["mixins"] or "").split(",") if m.strip())
        nodes[match["name"]] = DrawnNode(
            match["name"], stack[-1][1] if stack else None, mixins, match["note"]
        )
        stack.append((column, match["name"]))
    return nodes


def test_tree_parser_sees_the_whole_drawing() -> None:
    """The parser finds the root and nested nodes, so the drawing tests are not vacuous."""
    tree = _drawn_tree()

    assert tree["AmqpAgentsError"].parent is None
    assert tree["BrokerUnavailableError"].parent == "TransportError"
    assert tree["InvalidPayloadError"].mixins == {"ValueError"}


def test_docstring_tree_names_every_exported_exception() -> None:
    """The ASCII tree in the errors docstring draws exactly the exceptions in errors.__all__."""
    assert set(_drawn_tree()) == set(errors.__all__) - {"ErrorCode"}


def test_docstring_tree_draws_real_parents() -> None:
    """Each drawn class sits under its real base class in the library's tree."""
    for name, node in _drawn_tree().items():
        kind = EXPORTED[name]
        bases = [base.__name__ for base in kind.__bases__ if issubclass(base, AmqpAgentsError)]
        expected = bases[0] if bases else None
        assert node.parent == expected, f"{name} is drawn under {node.parent}, not {expected}"


def test_docstring_tree_shows_wire_codes() -> None:
    """Each AgentError subclass's line shows its wire code."""
    tree = _drawn_tree()
    for kind in AGENT_ERRORS:
        assert kind.code in tree[kind.__name__].note.split(), kind.__name__


def test_docstring_tree_shows_builtin_mixins() -> None:
    """The parenthesised builtins on each line are exactly the class's builtin bases."""
    for name, node in _drawn_tree().items():
        real = {base.__name__ for base in EXPORTED[name].__bases__ if base in BUILTIN_MIXINS}
        assert node.mixins == real, name
