"""The raw aio-pika RPC client: the design amqp-agents was oriented by, written by hand.

* an exclusive, server-named reply queue consumed ``no_ack`` (or, with ``direct=True``,
  RabbitMQ's direct reply-to: no reply queue at all, for ``benchmarks.levers``);
* ``{correlation_id: Future}``, the entry removed when the call ends;
* requests published ``mandatory`` on a channel with publisher confirms, each confirm
  awaited; every call bounded by ``asyncio.timeout``;
* JSON with the standard library.

Requests carry the same AMQP properties as the library's (``type`` = action,
``application/json``, priority 4, TTL and ``x-deadline`` header, message id,
timestamp), so the broker does the same work for both sides. They are persistent
(delivery mode 2) or, with ``persistent=False``, transient (delivery mode 1): the
cases choose the same on every side (``RpcSettings.persistent`` for ours).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from benchmarks.common import QUEUE_ARGUMENTS, RAW_REQUESTS_EXCHANGE, BenchError, compact_json

__all__ = ["DIRECT_REPLY_TO", "RawRpcClient"]

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


class RawRpcClient:
    """Calls ``action`` on the raw servers' queues (routing key = queue name)."""

    def __init__(
        self, url: str, *, action: str = "echo", persistent: bool = True, direct: bool = False
    ) -> None:
        self._url = url
        self._direct = direct
        """Replies by direct reply-to (``amq.rabbitmq.reply-to``), no reply queue."""
        self._action = action
        self._delivery_mode = (
            aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT
        )
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._reply_queue = ""

    @property
    def pending_calls(self) -> int:
        """Calls waiting for their reply."""
        return len(self._pending)

    async def start(self) -> None:
        """Connect, declare the requests exchange and the reply queue, consume replies."""
        self._connection = await aio_pika.connect(self._url)
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        self._exchange = await self._channel.declare_exchange(
            RAW_REQUESTS_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
        )
        reply_queue: aio_pika.abc.AbstractQueue
        if self._direct:  # consumed no-ack on the channel the requests are published on
            reply_queue = aio_pika.Queue(
                self._channel,
                DIRECT_REPLY_TO,
                durable=False,
                exclusive=False,
                auto_delete=False,
                arguments=None,
            )
        else:
            reply_queue = await self._channel.declare_queue(exclusive=True)
        self._reply_queue = reply_queue.name
        await reply_queue.consume(self._on_reply, no_ack=True)

    async def declare_queue(self, name: str) -> aio_pika.abc.AbstractQueue:
        """Declare and bind a request queue like the raw servers do (for pre-filling)."""
        assert self._channel is not None
        assert self._exchange is not None
        queue = await self._channel.declare_queue(name, durable=True, arguments=QUEUE_ARGUMENTS)
        await queue.bind(self._exchange, routing_key=name)
        return queue

    async def aclose(self) -> None:
        """Cancel pending calls and close the connection."""
        pending, self._pending = self._pending, {}
        for future in pending.values():
            future.cancel()
        if self._connection is not None:
            await self._connection.close()

    async def call(self, queue: str, payload: Any, *, timeout_s: float = 30.0) -> Any:
        """Send ``payload`` to ``queue`` and return the reply's ``data``."""
        assert self._exchange is not None
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        try:
            async with asyncio.timeout(timeout_s):
                await self._exchange.publish(
                    self._message(payload, timeout_s, correlation_id, self._reply_queue),
                    routing_key=queue,
                    mandatory=True,
                )
                reply = await future
        finally:
            self._pending.pop(correlation_id, None)
        if not reply.get("ok"):
            raise BenchError(f"error reply: {reply!r}")
        return reply.get("data")

    async def notify(self, queue: str, payload: Any, *, ttl_s: float) -> None:
        """Enqueue a request without ``reply_to`` (fire and forget), confirmed."""
        assert self._exchange is not None
        await self._exchange.publish(
            self._message(payload, ttl_s, None, None), routing_key=queue, mandatory=True
        )

    def _message(
        self, payload: Any, timeout_s: float, correlation_id: str | None, reply_to: str | None
    ) -> aio_pika.Message:
        now = time.time()
        return aio_pika.Message(
            compact_json(payload),
            content_type="application/json",
            type=self._action,
            delivery_mode=self._delivery_mode,
            priority=4,
            correlation_id=correlation_id,
            reply_to=reply_to,
            expiration=timeout_s,
            headers={"x-deadline": int((now + timeout_s) * 1000)},
            message_id=uuid.uuid4().hex,
            timestamp=int(now),
        )

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(json.loads(message.body))
