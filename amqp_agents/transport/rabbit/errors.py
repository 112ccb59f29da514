"""The one error mapper of the RabbitMQ transport: what aio-pika, aiormq and the socket
layer raise, turned into the library's tree (as httpx maps httpcore's errors).

Every exception class of ``aiormq.exceptions``, ``OSError`` (sockets, TLS) and
``TimeoutError`` is an instance of :data:`MAPPED_ERRORS`, and each of the three
mappers (connect, topology operation, publish) returns an
:class:`~amqp_agents.errors.AmqpAgentsError` for every one of them: a test walks the
module to prove it. ``asyncio.CancelledError`` is the exception that is not mapped but
sorted, by :func:`stray`: a real cancellation propagates, a stray one (aiormq cancels
what was pending on a dying connection) becomes a link error.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from typing import TYPE_CHECKING, Final

import aiormq

from amqp_agents.errors import (
    AccessRefusedError,
    BrokerUnavailableError,
    PublishRejectedError,
    PublishTimeoutError,
    QueueNotFoundError,
    ResourceLockedError,
    TopologyMismatchError,
    TransportError,
    UnroutableError,
)
from amqp_agents.transport.base import blocked_too_long, not_restored_in_time

if TYPE_CHECKING:
    from amqp_agents.models.envelope import Envelope

__all__ = [
    "ENDING_ERRORS",
    "LINK_ERRORS",
    "MAPPED_ERRORS",
    "cancelling",
    "close_detail",
    "connect_error",
    "publish_error",
    "stray",
    "topology_error",
]

LINK_ERRORS: Final = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
)
"""Failures of the link or the channel, as aiormq and asyncio raise them."""
ENDING_ERRORS: Final = (*LINK_ERRORS, TimeoutError, aiormq.exceptions.AMQPError)
"""What ending a consumer, a channel or a connection may raise when the link is going."""
MAPPED_ERRORS: Final = (TimeoutError, aiormq.exceptions.AMQPError, *LINK_ERRORS)
"""Everything the mappers below take (all of aiormq's exceptions among them)."""

_CLOSE_CODES: Final[dict[type[BaseException], int]] = {
    aiormq.exceptions.ChannelAccessRefused: 403,
    aiormq.exceptions.ChannelNotFoundEntity: 404,
    aiormq.exceptions.ChannelLockedResource: 405,
    aiormq.exceptions.ChannelPreconditionFailed: 406,
}
_NODE_DOWN: Final = ("is down or inaccessible", "stopped by supervisor", "not running")
"""How RabbitMQ's 404 says a queue exists but its node is down (3.x and 4.x texts)."""
_INEQUIVALENT: Final = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)'.*?received (?:the value )?(?P<new>'[^']*'|none)"
    r".*?current is (?:the value )?(?P<old>'[^']*'|none)"
)


def close_detail(exc: BaseException | None) -> tuple[int | None, str]:
    """The AMQP reply code and text of a channel's close, as far as aiormq kept them."""
    if exc is None:
        return None, "closed"
    for kind, code in _CLOSE_CODES.items():
        if isinstance(exc, kind):
            return code, str(exc.args[0]) if exc.args else str(exc)
    if isinstance(exc, aiormq.exceptions.ChannelClosed) and len(exc.args) == 2:
        code, text = exc.args
        return (code if isinstance(code, int) else None), str(text)
    return None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def cancelling() -> int:
    """How many cancellations the current task has pending (0 outside a task)."""
    task = asyncio.current_task()
    return 0 if task is None else task.cancelling()


def stray(exc: asyncio.CancelledError) -> BrokerUnavailableError:
    """Re-raise a real cancellation; turn a stray one into a link error.

    When a connection dies, aiormq cancels the futures of everything pending on it
    (confirms, RPC frames). That CancelledError reaches callers whose task nobody
    cancelled: passed on, it would end their task silently (a TaskGroup even ignores
    a child that ends cancelled), and a caller would vanish instead of getting an error.
    """
    task = asyncio.current_task()
    if task is None or task.cancelling():
        raise exc
    return BrokerUnavailableError("the broker connection closed during the operation")


def connect_error(url: str, exc: BaseException) -> TransportError:
    """Why connecting to ``url`` (already redacted) failed. Never echoes aiormq's text:
    it can include the URL with its password."""
    name = type(exc).__name__
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return AccessRefusedError(f"cannot connect to {url}: authentication failed")
    tls_error = exc if isinstance(exc, ssl.SSLError) else exc.__cause__
    if isinstance(tls_error, ssl.SSLError):
        return BrokerUnavailableError(
            f"cannot connect to {url}: the TLS handshake failed"
            f" ({getattr(tls_error, 'reason', None) or type(tls_error).__name__});"
            " check tls.ca_file,"
            " the broker's certificate and its host name"
        )
    if isinstance(exc, aiormq.exceptions.AMQPConnectionError | OSError):
        return BrokerUnavailableError(
            f"cannot connect to {url}: {name} (is the broker running and reachable?)"
        )
    if isinstance(exc, aiormq.exceptions.AMQPError):
        return AccessRefusedError(
            f"cannot connect to {url}: {name} (the broker closed the connection: is the"
            " vhost missing or not permitted?)"
        )
    return BrokerUnavailableError(f"cannot connect to {url}: no answer in time")


def _difference(reason: str) -> str:
    """What differs, in words, from RabbitMQ's ``inequivalent arg`` text ("" if not that):
    a queue type is named as such (absent means classic)."""
    found = _INEQUIVALENT.search(reason)
    if found is None:
        return ""
    arg, new, old = found["arg"], found["new"].strip("'"), found["old"].strip("'")
    if arg == "x-queue-type":
        return (
            f"it is a {'classic' if old == 'none' else old} queue and this declares a"
            f" {'classic' if new == 'none' else new} queue (Topology.queue_type / queue_types). "
        )
    return f"its {arg} is {old}, this declares {new}. "


def topology_error(what: str, exc: BaseException) -> TransportError:
    """Why a declare, bind, probe, delete or consume of ``what`` failed."""
    reason = str(exc)
    if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
        return TopologyMismatchError(
            f"{what} already exists on the broker with different arguments: "
            f"{_difference(reason)}({reason}). "
            "Queue and exchange arguments cannot change after declaration: configure the "
            "same values as the existing one (e.g. Topology.max_priority), or migrate by "
            "draining and deleting it (rabbitmqctl delete_queue NAME -p VHOST) or by "
            "switching to a new name."
        )
    if isinstance(exc, aiormq.exceptions.ChannelLockedResource):
        return ResourceLockedError(f"{what} is exclusive to another connection ({reason})")
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
        return AccessRefusedError(f"{what}: the broker refused it ({reason})")
    if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
        if any(sign in reason for sign in _NODE_DOWN):
            # It exists, on a cluster node that is down (a classic queue's home node):
            # unavailable until that node is back, not missing.
            return BrokerUnavailableError(f"{what} is on a node that is down ({reason})")
        return QueueNotFoundError(f"{what} does not exist ({reason})")
    if isinstance(exc, aiormq.exceptions.AMQPConnectionError) and "deprecated" in reason:
        # RabbitMQ 4.x refuses a deprecated feature (a transient non-exclusive queue,
        # global qos...) by closing the whole connection (541): a permanent refusal,
        # not a lost link to retry at once.
        return AccessRefusedError(
            f"{what}: the broker refuses a deprecated feature ({reason}); see the"
            " deprecated features of your RabbitMQ version"
        )
    if isinstance(exc, TimeoutError):
        return BrokerUnavailableError(f"{what}: the broker did not answer in time")
    return BrokerUnavailableError(f"{what}: {reason}")


def publish_error(
    exc: BaseException, envelope: Envelope, *, waiting_for: str, timeout_s: float
) -> TransportError:
    """Why a publish of ``envelope`` failed; ``waiting_for`` says what it was waiting
    for when it timed out ("link", "unblock", or "" for the confirm)."""
    if isinstance(exc, aiormq.exceptions.PublishError):
        return UnroutableError(envelope.exchange, envelope.routing_key)
    if isinstance(exc, aiormq.exceptions.DeliveryError):
        return PublishRejectedError(f"the broker refused the message: {exc.frame}")
    if isinstance(exc, TimeoutError):
        if waiting_for == "link":
            return not_restored_in_time(timeout_s)
        if waiting_for == "unblock":
            return blocked_too_long(timeout_s)
        return PublishTimeoutError(
            f"no confirm from the broker within {timeout_s:g}s; the message may or may"
            " not have been enqueued"
        )
    if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
        return QueueNotFoundError(f"cannot publish (404, no such exchange): {exc}")
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
        return AccessRefusedError(f"the broker refused the publish (403): {exc}")
    if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
        return PublishRejectedError(f"the broker refused the message (406): {exc}")
    return BrokerUnavailableError(f"publish failed: {type(exc).__name__}: {exc}")
