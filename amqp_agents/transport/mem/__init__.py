"""The in-memory broker and transport, split along their seams: queues and exchanges
(:mod:`.queues`), the broker (:mod:`.broker`), consumers and deliveries
(:mod:`.consumer`), the transport (:mod:`.transport`). Users import them from
:mod:`amqp_agents.transport.memory`, which also states the semantics modelled.
"""
