"""``python -m amqp_agents``: the same as the ``amqp-agents`` command."""

from amqp_agents.cli import main

raise SystemExit(main())
