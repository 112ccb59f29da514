"""Example agents (the demo app)."""
