"""Benchmarks of amqp-agents against hand-written aio-pika and FastStream, run by hand.

``python -m benchmarks`` runs every case (see ``benchmarks/README.md``). This package
must stay importable without ``amqp_agents`` or ``aio_pika`` at import time: the
FastStream side may run under another virtualenv (``benchmarks/.venv-faststream``), so
every module imports its heavy dependencies itself.
"""
