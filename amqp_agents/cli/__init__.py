"""The ``amqp-agents`` command: run a worker, call an agent, publish and listen to events.

The only package that reads the environment, parses arguments and installs signal
handlers; everything below it takes explicit arguments. :mod:`.app` is the entry point,
:mod:`.parser` the command line, :mod:`.worker` the ``run`` command, :mod:`.tools` the
others, :mod:`.plumbing` what they share (connect/close, signals, tracing).
"""

from amqp_agents.cli.app import main
from amqp_agents.cli.plumbing import load_agents

__all__ = ["load_agents", "main"]
