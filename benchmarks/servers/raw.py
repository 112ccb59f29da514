"""The raw aio-pika baseline's server sides: what one would write by hand.

One connection and one channel with publisher confirms and prefetch ``--prefetch``;
JSON with the standard library. Every reply is confirmed before its request is acked,
the same at-least-once order as the library's worker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from benchmarks.common import (
    EVENT_BINDING,
    QUEUE_ARGUMENTS,
    RAW_REQUESTS_EXCHANGE,
    DeliveryLog,
    compact_json,
)
from benchmarks.common import group_queue as group_queue_name
from benchmarks.proc import ServerMain, emit, ready, stdin_closed

__all__ = ["SERVERS"]


async def _request_queue(
    channel: aio_pika.abc.AbstractChannel, name: str
) -> aio_pika.abc.AbstractQueue:
    exchange = await channel.declare_exchange(
        RAW_REQUESTS_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
    )
    queue = await channel.declare_queue(name, durable=True, arguments=QUEUE_ARGUMENTS)
    await queue.bind(exchange, routing_key=name)
    return queue


async def echo(args: argparse.Namespace) -> None:
    """Reply ``{"ok": true, "data": <request>}`` to every request until stdin closes."""
    connection = await aio_pika.connect(args.url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=args.prefetch)
        queue = await _request_queue(channel, args.name)
        replies = channel.default_exchange

        async def on_request(message: AbstractIncomingMessage) -> None:
            data = json.loads(message.body)
            if message.reply_to:
                await replies.publish(
                    aio_pika.Message(
                        compact_json({"ok": True, "data": data}),
                        content_type="application/json",
                        correlation_id=message.correlation_id,
                        delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
                    ),
                    routing_key=message.reply_to,
                )
            await message.ack()

        await queue.consume(on_request)
        ready()
        await stdin_closed()


async def echo_coalesced_acks(args: argparse.Namespace) -> None:
    """:func:`echo`, but acks coalesced: once per loop turn, one ``multiple=True`` ack
    up to the highest delivery tag below which every request has its reply confirmed
    (a request still in progress is never acked with the others: the same at-least-once
    order). The lever "acks coalesced per loop turn" of issue 20, for
    ``python -m benchmarks.levers acks``."""
    connection = await aio_pika.connect(args.url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=args.prefetch)
        queue = await _request_queue(channel, args.name)
        replies = channel.default_exchange
        amqp = await channel.get_underlay_channel()
        loop = asyncio.get_running_loop()
        done: set[int] = set()
        acked = 0
        flushing = False
        acking: set[asyncio.Task[None]] = set()

        async def ack_up_to(tag: int) -> None:
            await amqp.basic_ack(tag, multiple=True, wait=False)

        def flush() -> None:
            nonlocal acked, flushing
            flushing = False
            top = acked
            while top + 1 in done:
                top += 1
                done.discard(top)
            if top > acked:
                acked = top
                task = loop.create_task(ack_up_to(top))
                acking.add(task)
                task.add_done_callback(acking.discard)

        async def on_request(message: AbstractIncomingMessage) -> None:
            nonlocal flushing
            data = json.loads(message.body)
            if message.reply_to:
                await replies.publish(
                    aio_pika.Message(
                        compact_json({"ok": True, "data": data}),
                        content_type="application/json",
                        correlation_id=message.correlation_id,
                        delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
                    ),
                    routing_key=message.reply_to,
                )
            assert message.delivery_tag is not None
            done.add(message.delivery_tag)
            if not flushing:
                flushing = True
                loop.call_soon(flush)

        await queue.consume(on_request)
        ready()
        await stdin_closed()


async def drain(args: argparse.Namespace) -> None:
    """Ack a pre-filled queue; report once ``--n`` messages were handled."""
    connection = await aio_pika.connect(args.url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=args.prefetch)
        queue = await _request_queue(channel, args.name)
        handled = 0
        first_ns = last_ns = 0
        done = asyncio.Event()

        async def on_request(message: AbstractIncomingMessage) -> None:
            nonlocal handled, first_ns, last_ns
            json.loads(message.body)
            now = time.monotonic_ns()
            if not handled:
                first_ns = now
            handled += 1
            if handled == args.n:
                last_ns = now
                done.set()
            await message.ack()

        await queue.consume(on_request)
        ready()
        await done.wait()
        emit("done", count=handled, first_ns=first_ns, last_ns=last_ns)
        await stdin_closed()


async def events(args: argparse.Namespace) -> None:
    """``--groups`` group queues on topic exchange ``--name``, one consumer (channel) each.

    Reports as :meth:`~benchmarks.common.DeliveryLog.report` says.
    """
    connection = await aio_pika.connect(args.url)
    async with connection:
        deliveries = DeliveryLog(args.groups, args.n, args.probes)

        def subscriber(group: int) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
            async def on_event(message: AbstractIncomingMessage) -> None:
                deliveries.record(group, json.loads(message.body))
                await message.ack()

            return on_event

        for group in range(args.groups):
            channel = await connection.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=args.prefetch)
            exchange = await channel.declare_exchange(
                args.name, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await channel.declare_queue(group_queue_name(args.name, group), durable=True)
            await queue.bind(exchange, routing_key=EVENT_BINDING)
            await queue.consume(subscriber(group))
        ready()
        await deliveries.report()
        await stdin_closed()


SERVERS: dict[str, ServerMain] = {
    "raw-echo": echo,
    "raw-echo-coalesced-acks": echo_coalesced_acks,
    "raw-drain": drain,
    "raw-events": events,
}
