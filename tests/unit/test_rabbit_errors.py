"""The RabbitMQ transport's one error mapper covers everything the libraries below it
can raise: each exception class of aiormq, the socket layer's and timeouts, through each
of the three mappers, becomes an exception of the library's tree with a message."""

from __future__ import annotations

import inspect
import ssl
from types import SimpleNamespace

import aiormq.exceptions
import pytest
from aiormq import spec

from amqp_agents.errors import (
    AccessRefusedError,
    AmqpAgentsError,
    BrokerUnavailableError,
    PublishRejectedError,
    PublishTimeoutError,
    QueueNotFoundError,
    ResourceLockedError,
    TopologyMismatchError,
    UnroutableError,
)
from amqp_agents.models.envelope import Envelope
from amqp_agents.transport.rabbit.errors import (
    MAPPED_ERRORS,
    connect_error,
    publish_error,
    topology_error,
)

ENVELOPE = Envelope(body=b"{}", exchange="agents", routing_key="ghost")


NACK = spec.Basic.Nack(delivery_tag=1)
RETURNED = SimpleNamespace(
    delivery=spec.Basic.Return(
        reply_code=312, reply_text="NO_ROUTE", exchange="agents", routing_key="ghost"
    )
)


def _instance(kind: type[BaseException]) -> BaseException:
    """An instance as aiormq raises it (its delivery errors carry the broker's frame)."""
    if issubclass(kind, aiormq.exceptions.PublishError):
        return kind(RETURNED, RETURNED.delivery)  # type: ignore[arg-type]  # duck-typed message
    if issubclass(kind, aiormq.exceptions.DeliveryError):
        return kind(None, NACK)
    return kind("reason")


AIORMQ = [
    kind
    for _, kind in inspect.getmembers(aiormq.exceptions, inspect.isclass)
    if issubclass(kind, BaseException) and kind.__module__.startswith(("aiormq", "pamqp"))
]
"""Every exception class aiormq's exception module offers (some are pamqp's own)."""
BELOW = [*AIORMQ, OSError, ConnectionResetError, TimeoutError, ssl.SSLError]


def test_the_walk_finds_aiormqs_exceptions() -> None:
    """Not vacuous: aiormq's root, its link error and the channel errors are found."""
    names = {kind.__name__ for kind in AIORMQ}
    assert {"AMQPError", "ChannelInvalidStateError", "ChannelPreconditionFailed"} <= names
    assert {"PublishError", "ConnectionClosed"} <= names


@pytest.mark.parametrize("kind", BELOW, ids=lambda kind: kind.__name__)
def test_every_exception_below_is_mapped_by_every_mapper(kind: type[BaseException]) -> None:
    """Caught by MAPPED_ERRORS, and turned into a library error with a message by the
    connect, topology and publish mappers alike (never re-raised as it was)."""
    exc = _instance(kind)
    assert isinstance(exc, MAPPED_ERRORS)
    mapped = [
        connect_error("amqp://host/", exc),
        topology_error("queue 'q'", exc),
        publish_error(exc, ENVELOPE, waiting_for="", timeout_s=1),
    ]
    for error in mapped:
        assert isinstance(error, AmqpAgentsError)
        assert str(error)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (aiormq.exceptions.ChannelPreconditionFailed("inequivalent arg"), TopologyMismatchError),
        (aiormq.exceptions.ChannelLockedResource("locked"), ResourceLockedError),
        (aiormq.exceptions.ChannelAccessRefused("no"), AccessRefusedError),
        (aiormq.exceptions.ChannelNotFoundEntity("no queue"), QueueNotFoundError),
        (TimeoutError(), BrokerUnavailableError),
        (aiormq.exceptions.ConnectionClosed(320, "forced"), BrokerUnavailableError),
        (
            aiormq.exceptions.ConnectionInternalError(
                541, "INTERNAL_ERROR - Feature 'transient_nonexcl_queues' is deprecated."
            ),
            AccessRefusedError,
        ),
    ],
)
def test_topology_errors_by_kind(exc: BaseException, expected: type[Exception]) -> None:
    """Each broker refusal of a declare has its own class; the rest is a link error."""
    assert type(topology_error("queue 'q'", exc)) is expected


@pytest.mark.parametrize(
    ("exc", "waiting_for", "expected"),
    [
        (_instance(aiormq.exceptions.PublishError), "", UnroutableError),
        (_instance(aiormq.exceptions.DeliveryError), "", PublishRejectedError),
        (TimeoutError(), "", PublishTimeoutError),
        (TimeoutError(), "unblock", PublishTimeoutError),
        (TimeoutError(), "link", BrokerUnavailableError),
        (aiormq.exceptions.ChannelNotFoundEntity("no exchange"), "", QueueNotFoundError),
        (aiormq.exceptions.ChannelAccessRefused("403"), "", AccessRefusedError),
        (aiormq.exceptions.ChannelPreconditionFailed("406"), "", PublishRejectedError),
        (ConnectionResetError(), "", BrokerUnavailableError),
    ],
)
def test_publish_errors_by_kind(
    exc: BaseException, waiting_for: str, expected: type[Exception]
) -> None:
    """A publish's outcome is told apart: unroutable, refused, unknown (timed out
    waiting for the confirm), never sent (timed out waiting for the link or an alarm)."""
    assert type(publish_error(exc, ENVELOPE, waiting_for=waiting_for, timeout_s=2)) is expected


def test_a_timeout_waiting_for_the_link_says_the_message_was_not_sent() -> None:
    """The three timeouts read differently: only the confirm's is 'may or may not'."""
    texts = {
        waiting: str(publish_error(TimeoutError(), ENVELOPE, waiting_for=waiting, timeout_s=2))
        for waiting in ("", "unblock", "link")
    }
    assert "may or may not" in texts[""]
    assert "blocks publishing" in texts["unblock"]
    assert "not sent" in texts["link"]


def test_connect_errors_never_echo_the_url_text_of_aiormq() -> None:
    """aiormq's message may carry the URL with its password: only the redacted URL given
    is named."""
    exc = aiormq.exceptions.AMQPConnectionError("amqp://u:hunter2@h/ refused")
    text = str(connect_error("amqp://u:***@h/", exc))
    assert "hunter2" not in text
    assert "amqp://u:***@h/" in text
    auth = connect_error("amqp://h/", aiormq.exceptions.ProbableAuthenticationError())
    assert isinstance(auth, AccessRefusedError)


@pytest.mark.parametrize(
    "text",
    [
        "NOT_FOUND - home node 'rabbit4a@localhost' of durable queue 'q' in vhost 'v' is"
        " down or inaccessible",
        "NOT_FOUND - queue 'q' in vhost 'v' process is stopped by supervisor",
    ],
)
def test_a_queue_on_a_node_that_is_down_is_unavailable_not_missing(text: str) -> None:
    """A classic queue whose node is down answers 404 too: that is a BrokerUnavailableError
    (retried, the queue comes back with its node), not QueueNotFoundError."""
    error = topology_error("queue 'q'", aiormq.exceptions.ChannelNotFoundEntity(text))
    assert type(error) is BrokerUnavailableError
    assert "node that is down" in str(error)
