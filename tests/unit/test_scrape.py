"""The parent's view of its children: bounded HTTP reads, and one merged /metrics page."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from amqp_agents.cli.scrape import get, merge_metrics
from amqp_agents.metrics import Metrics
from amqp_agents.runtime.health import HealthServer, ProbeResult
from tests.agents_for_tests import free_port


def page(in_flight: float, handled: int) -> bytes:
    metrics = Metrics()
    metrics.initialise(actions={"a": ["x"]})
    metrics.in_flight.set(in_flight)
    metrics.child(metrics.messages_handled, "a", "x", "ok").inc(handled)
    metrics.child(metrics.handler_duration, "a", "x").observe(0.01)
    return metrics.exposition()


def samples(text: bytes, name: str) -> dict[str, float]:
    """``{process label: value}`` of the samples named ``name`` (first label set each)."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("outcome", "ok") == "ok":
                if sample.labels.get("action", "x") == "x":
                    found.setdefault(sample.labels["process"], sample.value)
    return found


def test_each_childs_samples_are_labelled_with_its_index_under_one_family() -> None:
    merged = merge_metrics({0: page(2, 5), 1: page(3, 7)})
    assert samples(merged, "amqp_agents_in_flight") == {"0": 2.0, "1": 3.0}
    assert samples(merged, "amqp_agents_messages_handled_total") == {"0": 5.0, "1": 7.0}
    assert samples(merged, "amqp_agents_handler_duration_seconds_count") == {"0": 1.0, "1": 1.0}
    text = merged.decode()
    assert text.count("# TYPE amqp_agents_in_flight gauge") == 1
    assert text.count("# TYPE amqp_agents_messages_handled_total counter") == 1


def test_a_page_that_does_not_parse_is_left_out_and_extra_families_follow() -> None:
    up = GaugeMetricFamily("amqp_agents_process_up", "up", labels=["process"])
    up.add_metric(["0"], 1)
    up.add_metric(["1"], 0)
    merged = merge_metrics({0: page(1, 1), 1: b"\xff not metrics {"}, [up])
    assert samples(merged, "amqp_agents_in_flight") == {"0": 1.0}
    assert samples(merged, "amqp_agents_process_up") == {"0": 1.0, "1": 0.0}


@pytest.fixture
async def server() -> AsyncIterator[int]:
    """A probe server answering /readyz 503 and /metrics 200; its port."""
    health = HealthServer(
        {
            "/readyz": lambda: ProbeResult(503, b"connecting\n"),
            "/metrics": lambda: ProbeResult(200, page(1, 1)),
        },
        host="127.0.0.1",
        port=0,
    )
    await health.start()
    try:
        yield health.port
    finally:
        await health.aclose()


async def test_get_returns_the_status_and_body(server: int) -> None:
    ready = await get(server, "/readyz", timeout_s=5)
    assert ready is not None
    assert (ready.status, ready.body) == (503, b"connecting\n")
    metrics = await get(server, "/metrics", timeout_s=5)
    assert metrics is not None
    assert metrics.status == 200
    assert b"amqp_agents_in_flight 1.0" in metrics.body


async def test_get_gives_none_when_nothing_listens() -> None:
    assert await get(free_port(), "/readyz", timeout_s=5) is None


async def test_get_gives_none_within_its_bound_when_the_child_does_not_answer() -> None:
    done = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(1)  # takes the connection, never answers
            async with asyncio.timeout(30):
                await done.wait()
        finally:
            writer.close()

    mute = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = int(mute.sockets[0].getsockname()[1])
    try:
        began = time.monotonic()
        assert await get(port, "/readyz", timeout_s=0.3) is None
        assert time.monotonic() - began < 5
    finally:
        done.set()
        mute.close()
        await mute.wait_closed()
