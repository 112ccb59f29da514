"""The ``amqp-agents`` command line: what it accepts, and the help that explains it.

Only :mod:`amqp_agents.cli` uses this module. Usage errors are one line on stderr and
exit code 2 (never a traceback or a usage dump); numbers are checked here, before any
connection is made (a timeout must be finite and fit an AMQP expiration, counts and
durations positive); the global options are accepted before and after the command.
"""

from __future__ import annotations

import argparse
import math
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from amqp_agents.config import (
    DEFAULT_URL,
    MAX_TIMEOUT_S,
    MetricsSettings,
    RpcSettings,
    WorkerSettings,
)
from amqp_agents.models.messages import Priority

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["LOG_LEVELS", "build_parser", "package_version"]

_EPILOG = """\
examples:
  amqp-agents run amqp_agents.examples.tasks:app --metrics-port 9100
  amqp-agents call task_manager task_add '{"title": "write docs"}' --priority 7
  amqp-agents call task_manager task_add @payload.json       (or - for stdin)
  amqp-agents listen 'task.*' --count 10
  amqp-agents dead-letters task_manager --replay 1
  amqp-agents demo

global options (--url, --config, --log-level, --log-json) go before or after the command.
settings come from AMQP_AGENTS_* environment variables (config/amqp-agents.env.example);
command-line options override them.

exit codes:
  0    success
  1    an error reply (still printed), or a failure such as an unreachable broker
  2    bad usage or configuration (one line on stderr names the problem)
  130  stopped at once by a second Ctrl-C (143 for a second SIGTERM)
"""

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _Help(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout (examples, exit codes) as written."""


def _number(
    kind: Callable[[str], float], *, minimum: float, maximum: float = math.inf, what: str
) -> Callable[[str], float]:
    """An argparse type: a finite number in [minimum, maximum]."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {what}") from None
        if not (math.isfinite(value) and minimum <= value <= maximum):
            bound = (
                f"between {minimum:g} and {maximum:g}"
                if maximum < math.inf
                else f"at least {minimum:g}"
            )
            raise argparse.ArgumentTypeError(f"must be {bound}, not {text}")
        return value

    return parse


_SECONDS = _number(float, minimum=1e-3, what="number of seconds")
_COUNT = _number(int, minimum=1, what="whole number")


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The options every command takes. On a command's parser their defaults are
    suppressed, so that one given before the command is not reset after it."""
    extra: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
    parser.add_argument(
        "--url",
        help="broker URL, vhost in the path, or memory://"
        f" (default: $AMQP_URL, else {DEFAULT_URL})",
        **extra,
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="settings file (.json or .toml); environment variables override it",
        **extra,
    )
    parser.add_argument(
        "--log-json",
        action="store_true",
        help="log one JSON object per line (to stderr) instead of text",
        **extra,
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        metavar="LEVEL",
        help=f"{', '.join(LOG_LEVELS)} (default: INFO; WARNING for demo)",
        **extra,
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``amqp-agents`` command line: global options (accepted before or after the
    command), one sub-command each, every option with its help and default."""
    parser = _Parser(
        prog="amqp-agents",
        description="Agents that answer requests and events over RabbitMQ.",
        epilog=_EPILOG,
        formatter_class=_Help,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    _global_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _Parser(add_help=False)
    _global_options(common, suppress=True)

    def command(name: str, text: str, epilog: str | None = None) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=text,
            description=text,
            epilog=epilog,
            parents=[common],
            formatter_class=_Help,
        )

    worker = WorkerSettings()
    run = command(
        "run",
        "run a worker for the agents MODULE:ATTR names",
        "example: amqp-agents run greeter:Greeter --metrics-port 9100\n\n"
        "SIGTERM or Ctrl-C stops it gracefully (exit 0); a second one stops it at once,\n"
        "and the broker requeues the requests still running.",
    )
    run.add_argument(
        "target",
        metavar="MODULE:ATTR",
        help="an agent class, an instance, a list of them, or a function returning one",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve /metrics, /healthz and /readyz on this port"
        " (default: $AMQP_AGENTS_METRICS__PORT, else not served)",
    )
    run.add_argument(
        "--metrics-host",
        metavar="HOST",
        help="address to serve them on (default: $AMQP_AGENTS_METRICS__HOST, else"
        f" {MetricsSettings().host}: every interface)",
    )
    run.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        help="handlers running at once, and each queue's prefetch"
        f" (default: $AMQP_AGENTS_WORKER__CONCURRENCY, else {worker.concurrency})",
    )
    run.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="worker processes, supervised by a parent that restarts them; the parent"
        " serves the probes and one /metrics for all (for VMs; in Kubernetes prefer pods)"
        f" (default: $AMQP_AGENTS_WORKER__PROCESSES, else {worker.processes})",
    )
    run.add_argument(
        "--grace-period",
        type=float,
        metavar="SECONDS",
        help="how long in-flight work may finish on stop"
        f" (default: $AMQP_AGENTS_WORKER__GRACE_PERIOD_S, else {worker.grace_period_s:g})",
    )

    call = command(
        "call",
        "call an agent and print its reply (JSON, on stdout)",
        "examples:\n"
        '  amqp-agents call greeter greet \'{"name": "Ada"}\' --timeout 5\n'
        "  amqp-agents call greeter greet @payload.json\n"
        '  echo \'{"name": "Ada"}\' | amqp-agents call greeter greet -\n\n'
        "exit codes: 0 a successful reply, 1 an error reply (printed) or a failure,\n"
        "2 bad usage (invalid JSON, priority, timeout, name)",
    )
    call.add_argument("agent", metavar="AGENT", help="the agent's name (its routing key)")
    call.add_argument("action", metavar="ACTION", help="the action to run")
    call.add_argument(
        "payload",
        nargs="?",
        default="{}",
        metavar="PAYLOAD",
        help="a JSON object; @FILE reads it from a file, - from stdin (default: {})",
    )
    call.add_argument(
        "--priority",
        type=int,
        default=int(Priority.NORMAL),
        choices=range(10),
        metavar="0-9",
        help=f"0 (lowest) to 9 (highest) (default: {int(Priority.NORMAL)})",
    )
    call.add_argument(
        "--timeout",
        type=_number(float, minimum=1e-3, maximum=MAX_TIMEOUT_S, what="number of seconds"),
        metavar="SECONDS",
        help="how long to wait for the reply, at most one day"
        f" (default: $AMQP_AGENTS_RPC__TIMEOUT_S, else {RpcSettings().timeout_s:g})",
    )

    publish = command(
        "publish",
        "publish an event",
        'example: amqp-agents publish task.created \'{"id": "42"}\'',
    )
    publish.add_argument("event_type", metavar="EVENT_TYPE", help="dotted words: task.created")
    publish.add_argument(
        "payload",
        nargs="?",
        default="{}",
        metavar="PAYLOAD",
        help="a JSON object; @FILE reads it from a file, - from stdin (default: {})",
    )

    listen = command(
        "listen",
        "print events matching PATTERN as JSON lines, until stopped",
        "example: amqp-agents listen 'task.*' --duration 60\n\n"
        "A summary goes to stderr when it ends (Ctrl-C, --count or --duration).",
    )
    listen.add_argument("pattern", metavar="PATTERN", help="topic pattern: task.*, task.#, #")
    listen.add_argument(
        "--group",
        help="consume the durable group queue events.GROUP, shared with the group's other"
        " members (default: a private queue of this listener's own)",
    )
    listen.add_argument(
        "--count", type=_COUNT, metavar="N", help="exit after N events (default: no limit)"
    )
    listen.add_argument(
        "--duration",
        type=_SECONDS,
        metavar="SECONDS",
        help="exit after this many seconds (default: no limit)",
    )

    for name, text in (
        ("queues", "print ready messages and consumers of agent and event queues"),
        ("exporter", "serve only queue-depth metrics (for queues whose consumers are not ours)"),
    ):
        sub = command(
            name,
            text,
            f"example: amqp-agents {name} --agent task_manager"
            + (" --port 9101" if name == "exporter" else ""),
        )
        sub.add_argument("queue", nargs="*", metavar="QUEUE", help="queue names, as they are")
        sub.add_argument(
            "--agent", action="append", help="an agent: its queue and .dead (repeatable)"
        )
        sub.add_argument(
            "--group", action="append", help="an event group: its queue and .dead (repeatable)"
        )
        sub.add_argument("--app", metavar="MODULE:ATTR", help="every agent of an app")
        if name == "exporter":
            sub.add_argument("--port", type=int, required=True, help="port for /metrics")

    dead = command(
        "dead-letters",
        "list an agent's dead letters, or replay them to the agent",
        "examples:\n  amqp-agents dead-letters payments\n"
        "  amqp-agents dead-letters payments --replay 1",
    )
    dead.add_argument("agent", metavar="AGENT", help="the agent's name")
    dead.add_argument(
        "--limit",
        type=_COUNT,
        default=20,
        metavar="N",
        help="how many to list, oldest first (default: 20)",
    )
    dead.add_argument(
        "--replay",
        type=_COUNT,
        metavar="N",
        help="send the oldest N back to the agent's queue instead of listing",
    )

    asyncapi = command(
        "asyncapi",
        "write the AsyncAPI 3.0 document of the agents MODULE:ATTR names",
        "examples:\n  amqp-agents asyncapi amqp_agents.examples.tasks:app\n"
        "  amqp-agents asyncapi amqp_agents.examples.tasks:app --output asyncapi.yaml\n\n"
        "The server, exchange and queue names come from the settings (AMQP_URL without its\n"
        "credentials, AMQP_AGENTS_TOPOLOGY__*); nothing connects to the broker.",
    )
    asyncapi.add_argument(
        "target",
        metavar="MODULE:ATTR",
        help="an agent class, an instance, a list of them, or a function returning one",
    )
    asyncapi.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="write to FILE: YAML if it ends in .yaml or .yml, else JSON (default: stdout, JSON)",
    )

    command(
        "demo",
        "run the example app end to end in one process and print a transcript"
        " (on the in-process broker unless --url is given)",
    )
    return parser


def package_version() -> str:
    """The installed package's version (``unknown`` in a bare checkout)."""
    try:
        return metadata.version("amqp-agents")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        return "unknown"
