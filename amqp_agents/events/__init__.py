"""Events: publish/subscribe on a topic exchange with subscriber groups."""
