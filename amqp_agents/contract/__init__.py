"""Machine-readable contracts of agents: the AsyncAPI 3.0 document.

A layer above :mod:`amqp_agents.runtime` (it reads agents) and below the CLI. What an
agent accepts is read by :mod:`amqp_agents.runtime.describe`, which also answers the
in-band ``$describe`` action, so the document and a running agent agree.
"""
