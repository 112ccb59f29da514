"""Read a worker process's probes and metrics over loopback HTTP, and merge ``/metrics``.

The parent of ``amqp-agents run --processes N`` serves one ``/metrics`` page: it asks
every child for its own page when it is scraped (never in the background: no scrape, no
work) and relabels each child's samples with ``process="<index>"``, so series of
different processes never collide and Prometheus sums them as it sums pods
(``sum without (process) (rate(amqp_agents_messages_handled_total[1m]))``).

Guarantees: every request is bounded in time (``timeout_s``, connecting included) and
in size (:data:`MAX_RESPONSE_BYTES`); a child that does not answer in time, refuses
the connection or answers garbage gives ``None``, never an exception, so one stuck child
cannot take the parent's probes down with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping

__all__ = ["MAX_RESPONSE_BYTES", "Response", "get", "merge_metrics"]

MAX_RESPONSE_BYTES = 16 * 1024 * 1024
"""A child's answer larger than this is dropped (a /metrics page is tens of KiB)."""
_CHUNK = 65_536


@dataclass(frozen=True, slots=True)
class Response:
    """A child's HTTP answer."""

    status: int
    body: bytes


async def get(port: int, path: str, *, timeout_s: float) -> Response | None:
    """``GET http://127.0.0.1:<port><path>``; ``None`` if it fails or takes too long."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                writer.write(request.encode("ascii"))
                await writer.drain()
                raw = bytearray()
                while chunk := await reader.read(_CHUNK):
                    raw += chunk
                    if len(raw) > MAX_RESPONSE_BYTES:
                        return None
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return None
    head, _, body = bytes(raw).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        return None
    return Response(int(status_line[1]), body)


def merge_metrics(pages: Mapping[int, bytes], extra: Iterable[Metric] = ()) -> bytes:
    """One exposition of every child's page (child index -> page), each sample labelled
    ``process="<index>"``, followed by ``extra`` (the parent's own families).

    A family appears once, with the samples of every child that has it. A page that does
    not parse is left out (its child counts as not scraped).
    """
    families: dict[str, Metric] = {}
    for index, page in sorted(pages.items()):
        try:
            parsed = list(text_string_to_metric_families(page.decode("utf-8")))
        except ValueError:  # also UnicodeDecodeError
            continue
        for family in parsed:
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            label = {"process": str(index)}
            merged.samples += [s._replace(labels={**s.labels, **label}) for s in family.samples]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*families.values(), *extra]))
    return generate_latest(registry)


class _Families:
    """A collector of metric families already built (a scrape's snapshot)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)
