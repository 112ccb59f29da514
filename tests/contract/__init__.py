"""The transport contract: one suite, run against RabbitMQ and the in-memory broker."""
