"""Tolerant frame decoding: one peer's bad property value must not kill a connection.

aiormq decodes frames with pamqp and closes the *whole connection* on any decoding
error it does not expect (``InvalidFrameError``). Two property values any peer can put
on a message make pamqp raise one: an AMQP ``timestamp`` (property or header) that is
out of ``datetime``'s range (pamqp reads values above 2**32 as milliseconds; 10**15 is
"year 33658"), and a short string (``message_id``, ``correlation_id``, ``reply_to``,
``type``...) that is not UTF-8. The message is then redelivered and kills the next
connection too: one message stops every worker of an agent, and the attempt counting
never sees it, because no delivery is ever made.

:func:`install` makes those two decoders tolerant: a timestamp out of range decodes as
``None`` (the library never needs it), a short string that is not UTF-8 decodes with
U+FFFD replacement characters. The message is then delivered like any other and meets
the worker's ordinary checks. This changes pamqp's decoding tables for the whole
process (pamqp offers no per-connection hook); it only turns decoding errors into
values, so code that decodes valid frames sees no difference. It is idempotent and
called by :class:`~amqp_agents.transport.rabbitmq.RabbitTransport` before it connects.
"""

from __future__ import annotations

import datetime
import struct
from typing import Final

from pamqp import common
from pamqp import decode as pamqp_decode

__all__ = ["install", "tolerant_short_str", "tolerant_timestamp"]

_MILLISECONDS_ABOVE: Final = 0xFFFFFFFF
"""pamqp's rule: a timestamp above this is read as milliseconds."""


def tolerant_timestamp(value: bytes) -> tuple[int, datetime.datetime | None]:
    """pamqp's timestamp decoder, with ``None`` for a value no ``datetime`` can hold."""
    try:
        seconds: float = common.Struct.timestamp.unpack(value[0:8])[0]
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack timestamp value") from err
    if seconds > _MILLISECONDS_ABOVE:
        seconds /= 1000.0
    try:
        return 8, datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    except (ValueError, OverflowError, OSError):
        return 8, None


def tolerant_short_str(value: bytes) -> tuple[int, str]:
    """pamqp's short-string decoder, replacing bytes that are not UTF-8."""
    try:
        length = common.Struct.byte.unpack(value[0:1])[0]
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack short string value") from err
    return length + 1, value[1 : length + 1].decode("utf-8", errors="replace")


def install() -> None:
    """Use the tolerant decoders in pamqp (properties and header tables). Idempotent."""
    pamqp_decode.METHODS["timestamp"] = tolerant_timestamp
    pamqp_decode.METHODS["shortstr"] = tolerant_short_str
    pamqp_decode.TABLE_MAPPING[b"T"] = tolerant_timestamp
    # field_table() calls these module functions directly (keys are short strings).
    pamqp_decode.timestamp = tolerant_timestamp  # type: ignore[assignment]
    pamqp_decode.short_str = tolerant_short_str
