"""AMQP topic matching, exactly as RabbitMQ's topic exchange does it.

A routing key is split on ``.`` into words; words may be empty (``a..b`` has three)
and the empty key has *no* words. In a binding pattern ``*`` matches exactly one word
(possibly empty) and ``#`` matches zero or more words. So ``a.#.b`` matches ``a.b``,
``a.x.b`` and ``a.x.y.b``; ``#`` matches every key including ``""``; ``*`` does not
match ``""`` (no words), while ``*.*`` matches ``"."`` (two empty words).

Used to dispatch a group's deliveries to the handlers whose pattern matches, and by
the in-memory transport; a property test checks it against a reference model and an
integration test against the broker itself.
"""

from __future__ import annotations

from functools import lru_cache

__all__ = ["split_words", "topic_matches", "validate_pattern"]


def split_words(key: str) -> tuple[str, ...]:
    """The words of a routing key or pattern (``""`` has none)."""
    return tuple(key.split(".")) if key else ()


def validate_pattern(pattern: str) -> str:
    """Check a binding pattern: at most 255 bytes (an AMQP short string)."""
    if len(pattern.encode()) > 255:
        raise ValueError(f"topic pattern is longer than 255 bytes: {pattern[:40]!r}...")
    return pattern


@lru_cache(maxsize=4096)
def _pattern(pattern: str) -> tuple[str, ...]:
    return split_words(pattern)


def topic_matches(pattern: str, routing_key: str) -> bool:
    """True if a topic binding with ``pattern`` routes a message with ``routing_key``."""
    words = _pattern(pattern)
    key = split_words(routing_key)
    size = len(key)
    # The positions in ``key`` reachable after consuming the pattern so far.
    reachable = {0}
    for word in words:
        if word == "#":
            reachable = set(range(min(reachable), size + 1))
        else:
            reachable = {i + 1 for i in reachable if i < size and (word == "*" or key[i] == word)}
            if not reachable:
                return False
    return size in reachable
