"""The ``amqp-agents`` entry point: parse the command line, read the settings, run the
command on the chosen event loop, and turn errors into exit codes (0 success, 1 an error
reply or a failed run, 2 bad usage or configuration)."""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr, ValidationError
from pydantic_settings import SettingsError

from amqp_agents.cli import tools
from amqp_agents.cli.parent import run_processes
from amqp_agents.cli.parser import build_parser
from amqp_agents.cli.worker import run
from amqp_agents.config import Settings, load_settings
from amqp_agents.errors import (
    AmqpAgentsError,
    ConfigurationError,
)
from amqp_agents.logs import configure as configure_logging

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Coroutine, Sequence


__all__ = ["main", "settings_from"]

log = logging.getLogger("amqp_agents.cli")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``amqp-agents`` and ``python -m amqp_agents``."""
    args = build_parser().parse_args(argv)
    configure_logging(
        args.log_level or ("WARNING" if args.command == "demo" else "INFO"),
        json_lines=args.log_json,
    )
    try:
        settings = settings_from(args)
        if args.command == "demo" and not args.url:
            args.url = "memory://"  # the demo runs anywhere unless pointed at a broker
            settings = settings_from(args)
        command = {
            "run": run,
            "call": tools.call,
            "publish": tools.publish,
            "listen": tools.listen,
            "demo": tools.demo,
            "dead-letters": tools.dead_letters,
            "queues": tools.queues,
            "exporter": tools.exporter,
            "asyncapi": tools.asyncapi,
        }
        if args.command == "run" and settings.worker.processes > 1:
            raw = list(sys.argv[1:] if argv is None else argv)
            command["run"] = functools.partial(run_processes, argv=raw)
        return _run_bounded(
            _loop_factory(settings.event_loop), command[args.command](args, settings)
        )
    except ValidationError as exc:
        print(f"amqp-agents: configuration error: {_describe(exc)}", file=sys.stderr)
        return 2
    except (ConfigurationError, SettingsError) as exc:
        print(f"amqp-agents: configuration error: {exc}", file=sys.stderr)
        return 2
    except AmqpAgentsError as exc:
        print(f"amqp-agents: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings: file (--config), then environment, then command-line options on top."""
    overrides: dict[str, Any] = {}
    if args.url:
        overrides["url"] = SecretStr(args.url)
    metrics: dict[str, Any] = {}
    if getattr(args, "metrics_port", None) is not None:
        metrics["port"] = args.metrics_port
    if getattr(args, "metrics_host", None) is not None:
        metrics["host"] = args.metrics_host
    if metrics:
        overrides["metrics"] = metrics
    worker: dict[str, Any] = {}
    if getattr(args, "concurrency", None) is not None:
        worker["concurrency"] = args.concurrency
    if getattr(args, "processes", None) is not None:
        worker["processes"] = args.processes
    if getattr(args, "grace_period", None) is not None:
        worker["grace_period_s"] = args.grace_period
    if worker:
        overrides["worker"] = worker
    return load_settings(args.config, **overrides)


def _describe(exc: ValidationError) -> str:
    """A validation error as one line: each bad setting's dotted name and what is wrong
    (pydantic's own text spans lines and ends in a link per error)."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in error["loc"])
        parts.append(f"{where}: {error['msg']}" if where else error["msg"])
    return "; ".join(parts)


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``event_loop`` asks for: uvloop when installed (``auto``), unless
    ``asyncio`` is chosen; ``uvloop`` insists on it.

    Raises:
        ConfigurationError: ``uvloop`` is asked for but not installed.
    """
    if choice == "asyncio":
        return None
    try:
        import uvloop  # an optional extra (amqp-agents[speed])
    except ImportError:
        if choice == "uvloop":
            raise ConfigurationError(
                "event_loop is uvloop but uvloop is not installed: pip install 'amqp-agents[speed]'"
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


_EXIT_GRACE_S = 5.0
"""How long tasks left over when a command returns may take to end once cancelled."""


def _run_bounded(
    factory: Callable[[], asyncio.AbstractEventLoop] | None, main: Coroutine[Any, Any, int]
) -> int:
    """Run ``main`` on a new loop, then close the loop within a bound.

    ``asyncio.Runner`` cancels the tasks left over and waits for them without a bound:
    a library's close that swallows its cancellation (seen: aio-pika's connection close
    after the broker closed the connection with a channel error) would keep the
    process from ever exiting. Here they get :data:`_EXIT_GRACE_S`, then are left
    behind with a warning and the loop is closed anyway.
    """
    loop = factory() if factory is not None else asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            left = [task for task in asyncio.all_tasks(loop) if not task.done()]
            for task in left:
                task.cancel()
            if left:
                _done, stuck = loop.run_until_complete(asyncio.wait(left, timeout=_EXIT_GRACE_S))
                if stuck:
                    log.warning("%d task(s) did not end at exit; left behind", len(stuck))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
