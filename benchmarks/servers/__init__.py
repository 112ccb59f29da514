"""Server sides, one process each: ``python -m benchmarks.servers KIND --url URL --name NAME``.

``ours-*`` run the library's :class:`~amqp_agents.Worker`, ``raw-*`` hand-written
aio-pika, ``faststream-*`` FastStream (in :mod:`benchmarks.faststream_side`, which may
run under its own virtualenv). The protocol with the bench process is in
:mod:`benchmarks.proc`.
"""
