"""Request/reply over the agents exchange."""
