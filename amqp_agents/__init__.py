"""amqp-agents."""
