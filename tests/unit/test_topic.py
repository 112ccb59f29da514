"""AMQP topic matching: ``topic_matches`` against a reference model and a table of examples.

The integration suite (``tests/integration/test_events.py``) checks the same function
against the broker itself; here it is checked against the definition.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from amqp_agents.models.topic import split_words, topic_matches, validate_pattern

# No example database: the unit suite must not write files into the work tree.
property_settings = settings(database=None, max_examples=2000, deadline=None)


def words(text: str) -> tuple[str, ...]:
    """Split on '.', independently of the library: the empty key has zero words."""
    return tuple(text.split(".")) if text else ()


def reference_matches(pattern: tuple[str, ...], key: tuple[str, ...]) -> bool:
    """AMQP topic semantics by definition: ``*`` one word, ``#`` zero or more."""
    if not pattern:
        return not key
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        # Zero words, or swallow one word and keep the '#' for the rest.
        return reference_matches(rest, key) or (bool(key) and reference_matches(pattern, key[1:]))
    if not key:
        return False
    if head == "*" or head == key[0]:
        return reference_matches(rest, key[1:])
    return False


# Few words, so that empty words, '*' and '#' (and their neighbours) are frequent.
PATTERN_WORDS = st.sampled_from(["", "*", "#", "a", "b"])
# Keys are literal: a '*' or '#' in a routing key is an ordinary word.
KEY_WORDS = st.sampled_from(["", "a", "b", "c", "*", "#"])
patterns = st.lists(PATTERN_WORDS, max_size=6).map(".".join)
keys = st.lists(KEY_WORDS, max_size=6).map(".".join)


@property_settings
@given(pattern=patterns, key=keys)
@example(pattern="a.#.b", key="a.b")
@example(pattern="#.#", key="")
@example(pattern="*.#.*", key="a")
def test_topic_matches_agrees_with_the_reference_model(pattern: str, key: str) -> None:
    """For any pattern and key, topic_matches equals the recursive definition."""
    assert topic_matches(pattern, key) is reference_matches(words(pattern), words(key))


@property_settings
@given(key=keys)
def test_a_key_used_as_a_pattern_matches_itself(key: str) -> None:
    """A key with no '*'/'#' words, bound as a pattern, routes exactly that key."""
    literal = ".".join(w for w in words(key) if w not in {"*", "#"})
    assert topic_matches(literal, literal)
    assert topic_matches("#", literal)


EXAMPLES = [
    # (pattern, key, matches)
    ("task.created", "task.created", True),
    ("task.created", "task.completed", False),
    ("task.*", "task.created", True),
    ("task.*", "task", False),
    ("task.*", "task.created.late", False),
    ("task.#", "task", True),
    ("task.#", "task.created.late", True),
    ("task.#", "tasks.created", False),
    ("*", "a", True),
    ("*", "", False),  # the empty key has no words
    ("*", ".", False),  # two empty words
    ("*", "a.b", False),
    ("*.*", ".", True),
    ("*.*", "a.", True),
    ("#", "", True),
    ("#", ".", True),
    ("#", "a.b.c", True),
    ("", "", True),
    ("", ".", False),
    ("", "a", False),
    ("a.#.b", "a.b", True),
    ("a.#.b", "a.x.b", True),
    ("a.#.b", "a.x.y.b", True),
    ("a.#.b", "a.x.y", False),
    ("a.#.b", "b.a.b", False),
    ("a.*.b", "a.b", False),
    ("a.*.b", "a.x.b", True),
    ("a.*.b", "a..b", True),  # '*' matches the empty word
    ("a..b", "a..b", True),
    ("a..b", "a.b", False),
    ("a.", "a.", True),
    ("a.", "a", False),
    ("a.*", "a.", True),
    ("a.#", "a.", True),
    ("#.a", "a", True),
    ("#.a", "b.a", True),
    ("#.a", "a.b", False),
    ("#.#", "", True),
    ("#.*", "", False),
    ("#.*", "a", True),
    ("*.#", "a.b.c", True),
    ("a.#.#.b", "a.b", True),
    ("a.#.*.#.b", "a.b", False),
    ("a.#.*.#.b", "a.x.b", True),
    ("a*", "ab", False),  # '*' inside a word is literal
    ("a*", "a*", True),
    ("a#", "a.b", False),
]


@pytest.mark.parametrize(("pattern", "key", "expected"), EXAMPLES)
def test_topic_matches_examples(pattern: str, key: str, expected: bool) -> None:
    """The documented edge cases of RabbitMQ's topic exchange."""
    assert topic_matches(pattern, key) is expected
    assert reference_matches(words(pattern), words(key)) is expected


@pytest.mark.parametrize(
    ("key", "expected"),
    [("", ()), ("a", ("a",)), (".", ("", "")), ("a..b", ("a", "", "b")), ("a.", ("a", ""))],
)
def test_split_words(key: str, expected: tuple[str, ...]) -> None:
    """Words are split on every '.', empty words kept; the empty key has none."""
    assert split_words(key) == expected


def test_validate_pattern_bounds_the_length() -> None:
    """A pattern over 255 bytes (an AMQP short string) is refused; 255 is accepted."""
    assert validate_pattern("a" * 255) == "a" * 255
    with pytest.raises(ValueError, match="255 bytes"):
        validate_pattern("é" * 128)  # 256 bytes in UTF-8
