"""The FastStream comparison: servers, and clients the bench runs in-process or in a child.

Imports only FastStream, the standard library and the stdlib-only bench helpers, so it
also runs under ``benchmarks/.venv-faststream`` when FastStream cannot share the
project's virtualenv. FastStream is configured for speed, not for its defaults: no
per-message access log (``logger=None``), prefetch as the case asks on every
subscriber's channel. Its requests go to a durable ``x-max-priority`` queue, like
ours, transient (its default) or persistent as the case asks.

Child entry points::

    python -m benchmarks.servers faststream-echo|faststream-events --url URL --name NAME ...
    python -m benchmarks.faststream_side client-rpc|client-events --url URL --name NAME ...
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

from faststream.rabbit import Channel, ExchangeType, RabbitBroker, RabbitExchange, RabbitQueue

from benchmarks.common import (
    EVENT_BINDING,
    EVENT_ROUTING_KEY,
    MAX_PRIORITY,
    BenchError,
    DeliveryLog,
    Published,
    drive,
    echo_payload,
    event_payload,
    group_queue,
    run_loop,
)
from benchmarks.proc import ServerMain, emit, ready, stdin_closed

__all__ = ["SERVERS", "events_client", "rpc_client"]

CALL_TIMEOUT_S = 30.0


def _broker(url: str, prefetch: int = 100) -> RabbitBroker:
    return RabbitBroker(url, default_channel=Channel(prefetch_count=prefetch), logger=None)


def _request_queue(name: str) -> RabbitQueue:
    return RabbitQueue(name, durable=True, arguments={"x-max-priority": MAX_PRIORITY})


def _events_exchange(name: str) -> RabbitExchange:
    return RabbitExchange(name, type=ExchangeType.TOPIC, durable=True)


# -- servers --------------------------------------------------------------------------


async def echo_server(args: argparse.Namespace) -> None:
    """A subscriber on the request queue that returns its payload (FastStream replies)."""
    broker = _broker(args.url, args.prefetch)

    @broker.subscriber(_request_queue(args.name), channel=Channel(prefetch_count=args.prefetch))
    async def echo(body: dict[str, Any]) -> dict[str, Any]:
        return body

    await broker.start()
    try:
        ready()
        await stdin_closed()
    finally:
        await broker.stop()


async def events_server(args: argparse.Namespace) -> None:
    """One subscriber per group; reports like ``raw-events`` (see :mod:`.servers.raw`)."""
    broker = _broker(args.url, args.prefetch)
    deliveries = DeliveryLog(args.groups, args.n, args.probes)

    def subscribe(group: int) -> None:
        @broker.subscriber(
            RabbitQueue(group_queue(args.name, group), durable=True, routing_key=EVENT_BINDING),
            _events_exchange(args.name),
            channel=Channel(prefetch_count=args.prefetch),
        )
        async def on_event(body: dict[str, Any]) -> None:
            deliveries.record(group, body)

    for group in range(args.groups):
        subscribe(group)
    await broker.start()
    try:
        ready()
        await deliveries.report()
        await stdin_closed()
    finally:
        await broker.stop()


SERVERS: dict[str, ServerMain] = {
    "faststream-echo": echo_server,
    "faststream-events": events_server,
}

# -- clients --------------------------------------------------------------------------


async def rpc_client(
    url: str,
    name: str,
    *,
    calls: int,
    concurrency: int,
    warmup: int,
    persistent: bool,
    server_pid: int | None = None,
    broker_pid: int | None = None,
) -> dict[str, float]:
    """``broker.request`` against the echo server; see :meth:`DriveResult.metrics`."""
    broker = _broker(url)
    await broker.connect()
    try:
        payload = echo_payload()

        async def call() -> None:
            reply = await broker.request(
                payload, queue=name, persist=persistent, priority=4, timeout=CALL_TIMEOUT_S
            )
            if await reply.decode() != payload:
                raise BenchError(f"FastStream echo returned {reply.body[:200]!r}")

        await drive(call, calls=warmup, concurrency=concurrency)
        measured = await drive(
            call,
            calls=calls,
            concurrency=concurrency,
            server_pid=server_pid,
            broker_pid=broker_pid,
        )
        return measured.metrics()
    finally:
        await broker.stop()


async def events_client(
    url: str, exchange: str, *, events: int, concurrency: int, probe: bool = False
) -> Published:
    """Publish ``events`` events (confirmed, persistent) from ``concurrency`` loops.

    ``probe`` marks them as latency probes (see :class:`~benchmarks.common.DeliveryLog`).
    """
    broker = _broker(url)
    await broker.connect()
    try:
        target = _events_exchange(exchange)
        await broker.declare_exchange(target)
        seq = 0

        async def publish() -> None:
            nonlocal seq
            seq += 1
            await broker.publish(
                event_payload(time.monotonic_ns(), seq, probe=probe),
                exchange=target,
                routing_key=EVENT_ROUTING_KEY,
                persist=True,
                content_type="application/json",
            )

        started = time.monotonic_ns()
        result = await drive(publish, calls=events, concurrency=concurrency)
        return Published(started, time.monotonic_ns(), result.cpu_s)
    finally:
        await broker.stop()


def _client_main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.faststream_side")
    parser.add_argument("kind", choices=["client-rpc", "client-events"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--server-pid", type=int, default=None)
    parser.add_argument("--broker-pid", type=int, default=None)
    parser.add_argument("--probe", action="store_true", help="publish latency probes")
    parser.add_argument("--persistent", action="store_true", help="persistent RPC requests")
    parser.add_argument("--uvloop", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    ready()
    result: dict[str, Any]
    if args.kind == "client-rpc":
        result = run_loop(
            rpc_client(
                args.url,
                args.name,
                calls=args.n,
                concurrency=args.concurrency,
                warmup=args.warmup,
                persistent=args.persistent,
                server_pid=args.server_pid,
                broker_pid=args.broker_pid,
            ),
            use_uvloop=args.uvloop,
        )
    else:
        published = run_loop(
            events_client(
                args.url, args.name, events=args.n, concurrency=args.concurrency, probe=args.probe
            ),
            use_uvloop=args.uvloop,
        )
        result = dataclasses.asdict(published)
    emit("done", **result)


if __name__ == "__main__":
    _client_main()
