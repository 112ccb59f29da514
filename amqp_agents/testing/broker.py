"""Test helpers for a real RabbitMQ: throw-away vhosts and broker inspection.

Uses ``rabbitmqctl`` on this machine (the broker's own CLI). Every call is bounded by
a timeout and raises :class:`BrokerAdminError` with the tool's output on failure, so a
broken broker fails a test run loudly instead of hanging it.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import uuid
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

__all__ = ["BrokerAdmin", "BrokerAdminError", "QueueRow", "broker_reachable", "url_for_vhost"]


class BrokerAdminError(RuntimeError):
    """rabbitmqctl failed or is missing."""


@dataclass(frozen=True, slots=True)
class QueueRow:
    """One line of ``rabbitmqctl list_queues``."""

    name: str
    messages: int
    consumers: int


def url_for_vhost(url: str, vhost: str) -> str:
    """``url`` with its vhost path replaced (percent-encoded)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))


def broker_reachable(url: str, timeout_s: float = 2.0) -> bool:
    """True if a TCP connection to the URL's host and port succeeds."""
    parts = urlsplit(url)
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    try:
        with socket.create_connection((parts.hostname or "localhost", port), timeout=timeout_s):
            return True
    except OSError:
        return False


class BrokerAdmin:
    """Runs ``rabbitmqctl`` commands against the local node."""

    def __init__(self, ctl: str = "rabbitmqctl", *, timeout_s: float = 60.0) -> None:
        path = shutil.which(ctl)
        if path is None:
            raise BrokerAdminError(f"{ctl} not found on PATH")
        self._ctl = path
        self._timeout_s = timeout_s

    def run(self, *args: str) -> str:
        """Run ``rabbitmqctl ARGS`` and return stdout; raise on failure or timeout."""
        try:
            done = subprocess.run(  # noqa: S603  # fixed executable, our own arguments
                [self._ctl, "-q", *args],
                capture_output=True,
                text=True,
                timeout=self._timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise BrokerAdminError(f"rabbitmqctl {' '.join(args)} timed out") from exc
        if done.returncode != 0:
            raise BrokerAdminError(
                f"rabbitmqctl {' '.join(args)} failed ({done.returncode}): "
                f"{done.stderr.strip() or done.stdout.strip()}"
            )
        return done.stdout

    async def arun(self, *args: str) -> str:
        """:meth:`run` off the event loop."""
        return await asyncio.to_thread(self.run, *args)

    def create_vhost(self, prefix: str = "amqp-agents-test") -> str:
        """A new vhost named ``prefix-<random>`` that ``guest`` may use fully."""
        vhost = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.run("add_vhost", vhost)
        self.run("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        return vhost

    def delete_vhost(self, vhost: str) -> None:
        """Delete a vhost and everything in it."""
        self.run("delete_vhost", vhost)

    def list_queues(self, vhost: str) -> dict[str, QueueRow]:
        """Queues of a vhost with ready-message and consumer counts, by name."""
        out = self.run(
            "list_queues", "-p", vhost, "--no-table-headers", "name", "messages", "consumers"
        )
        rows: dict[str, QueueRow] = {}
        for line in out.splitlines():
            fields = line.split("\t")
            if len(fields) == 3 and fields[1].isdigit():
                rows[fields[0]] = QueueRow(fields[0], int(fields[1]), int(fields[2]))
        return rows

    def close_connections(self, vhost: str, reason: str = "closed by test") -> int:
        """Close every client connection to ``vhost``; returns how many."""
        out = self.run("list_connections", "--no-table-headers", "pid", "vhost")
        closed = 0
        for line in out.splitlines():
            fields = line.split("\t")
            if len(fields) == 2 and fields[1] == vhost:
                self.run("close_connection", fields[0], reason)
                closed += 1
        return closed
