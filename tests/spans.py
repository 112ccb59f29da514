"""Finished spans for tracing tests: the SDK's in-memory exporter, and a way to await them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind


class _Signal(SpanProcessor):
    """Wakes the waiters each time a span ends (after the exporter has it)."""

    def __init__(self) -> None:
        self.ended = asyncio.Event()

    def on_end(self, span: ReadableSpan) -> None:
        self.ended.set()


class Spans:
    """A tracer provider of the test's own whose finished spans can be awaited."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self._signal = _Signal()
        self.provider.add_span_processor(self._signal)

    @property
    def finished(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    async def wait_for(
        self, predicate: Callable[[Sequence[ReadableSpan]], bool], *, timeout_s: float = 5.0
    ) -> list[ReadableSpan]:
        """The finished spans once ``predicate`` holds for them (bounded)."""
        async with asyncio.timeout(timeout_s):
            while not predicate(self.finished):
                self._signal.ended.clear()
                await self._signal.ended.wait()
        return self.finished

    async def named(self, *names: str, timeout_s: float = 5.0) -> dict[str, ReadableSpan]:
        """The one finished span of each name (fails if a name has several)."""

        def present(spans: Sequence[ReadableSpan]) -> bool:
            return all(any(span.name == name for span in spans) for name in names)

        spans = await self.wait_for(present, timeout_s=timeout_s)
        found: dict[str, ReadableSpan] = {}
        for name in names:
            matching = [span for span in spans if span.name == name]
            assert len(matching) == 1, f"{len(matching)} spans named {name!r}: {matching}"
            found[name] = matching[0]
        return found

    def shutdown(self) -> None:
        self.provider.shutdown()


def parent_of(span: ReadableSpan) -> int | None:
    """The span id of ``span``'s parent, ``None`` for a root."""
    return None if span.parent is None else span.parent.span_id


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.trace_id)


__all__ = ["SpanKind", "Spans", "parent_of", "span_id", "trace_id"]
