"""Log formatting for the CLI: plain text or one JSON object per line.

Structured fields (``agent``, ``action``, ``correlation_id``, ``outcome``, ``queue``)
come from ``extra={...}`` on the library's log calls and become JSON keys. Whatever
the format, anything that looks like a broker URL with a password is redacted, so a
password can't reach the logs even through a third-party message.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Final

__all__ = ["FIELDS", "JsonFormatter", "RedactingFormatter", "configure"]

FIELDS: Final = ("agent", "action", "correlation_id", "outcome", "queue", "code")
_URL_PASSWORD: Final = re.compile(r"(amqps?://[^:/@\s]*:)[^@\s]*@")


def _redact(text: str) -> str:
    return _URL_PASSWORD.sub(r"\1***@", text)


class RedactingFormatter(logging.Formatter):
    """The standard text format, with URL passwords redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return _redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": _redact(record.getMessage()),
        }
        for key in FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["exception"] = _redact(self.formatException(record.exc_info))
        return json.dumps(line, default=str)


def configure(level: str, *, json_lines: bool) -> None:
    """Send logs to stderr, as text or JSON lines (the CLI's only logging setup)."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if json_lines
        else RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiormq logs each failed connect or reconnect try at ERROR, just before the
    # transport raises the same failure as a clear error of ours: one line per problem
    # is enough, so aiormq's own lines show only when debugging.
    debugging = root.getEffectiveLevel() <= logging.DEBUG
    logging.getLogger("aiormq").setLevel(logging.NOTSET if debugging else logging.CRITICAL)
