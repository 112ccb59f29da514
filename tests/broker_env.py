"""Where the broker under test is, and how the tests drive it, read from the environment.

The one place the suite learns it, so that pointing the suite at another node (a
RabbitMQ 4.0 node of ``scripts/rabbitmq4``, say) moves every piece that talks to the
broker: the URL, the fault proxy's upstream, the CLI that creates vhosts and closes
connections, the Prometheus plugin's port.

* ``AMQP_AGENTS_TEST_URL``: the broker's root URL (default ``amqp://guest:guest@127.0.0.1:5672/``).
* ``AMQP_AGENTS_TEST_RABBITMQCTL``: the command line of that broker's ``rabbitmqctl``
  (default ``rabbitmqctl``), split like a shell would; a relative path is taken from the
  repository root. For the 4.0 node: ``scripts/rabbitmq4 ctl rabbit4@localhost``.
* ``AMQP_AGENTS_TEST_RABBITMQ_METRICS_PORT``: the port of its ``rabbitmq_prometheus``
  plugin (default 15692).
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEST_URL = "amqp://guest:guest@127.0.0.1:5672/"


def root_url() -> str:
    """The root URL (default vhost) of the broker under test."""
    return os.environ.get("AMQP_AGENTS_TEST_URL", DEFAULT_TEST_URL)


def broker_address(url: str | None = None) -> tuple[str, int]:
    """``(host, port)`` of ``url``, by default of the broker under test."""
    parts = urlsplit(url or root_url())
    default_port = 5671 if parts.scheme == "amqps" else 5672
    return parts.hostname or "127.0.0.1", parts.port or default_port


def rabbitmqctl_command() -> list[str]:
    """The broker's ``rabbitmqctl`` as a command line, its program resolved to a path.

    Raises:
        FileNotFoundError: the program is not found (on PATH, or from the repository root).
    """
    words = shlex.split(os.environ.get("AMQP_AGENTS_TEST_RABBITMQCTL", "rabbitmqctl"))
    if not words:
        raise FileNotFoundError("AMQP_AGENTS_TEST_RABBITMQCTL is empty")
    program = words[0]
    found = str(ROOT / program) if "/" in program and not program.startswith("/") else program
    path = shutil.which(found)
    if path is None:
        raise FileNotFoundError(f"{program} not found (AMQP_AGENTS_TEST_RABBITMQCTL)")
    return [path, *words[1:]]


def rabbitmq_metrics_port() -> int:
    """The port of the broker's ``rabbitmq_prometheus`` plugin."""
    return int(os.environ.get("AMQP_AGENTS_TEST_RABBITMQ_METRICS_PORT", "15692"))
