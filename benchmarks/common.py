"""What every case shares: payloads, the load driver, statistics, the event loop, RSS.

Only the standard library is imported here (and ``uvloop`` lazily), so the FastStream
side can use this module under its own virtualenv.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = [
    "EVENT_BINDING",
    "EVENT_ROUTING_KEY",
    "MAX_PRIORITY",
    "PAYLOAD_BYTES",
    "QUEUE_ARGUMENTS",
    "RAW_REQUESTS_EXCHANGE",
    "BenchError",
    "CpuWindow",
    "DeliveryLog",
    "DriveResult",
    "Published",
    "compact_json",
    "drive",
    "echo_payload",
    "event_payload",
    "find_broker_pid",
    "group_queue",
    "percentile",
    "process_cpu_s",
    "progress",
    "rss_bytes",
    "run_loop",
    "uvloop_available",
]

T = TypeVar("T")

PAYLOAD_BYTES = 200
"""Size of the JSON payload of every RPC request and event."""

_STARTED = time.monotonic()


class BenchError(RuntimeError):
    """A side did not do the work it was asked (an error reply, a missing message...)."""


def progress(message: str) -> None:
    """One progress line on stderr, prefixed with the seconds since the run started."""
    print(f"[{time.monotonic() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


def echo_payload() -> dict[str, str]:
    """A JSON object that encodes (compactly) to exactly :data:`PAYLOAD_BYTES` bytes."""
    ident = uuid.uuid4().hex
    overhead = len(json.dumps({"id": ident, "text": ""}, separators=(",", ":")))
    return {"id": ident, "text": "x" * (PAYLOAD_BYTES - overhead)}


def event_payload(sent_ns: int, seq: int, *, probe: bool = False) -> dict[str, Any]:
    """An event payload of :data:`PAYLOAD_BYTES` bytes (compact JSON) with its publish time.

    ``sent_ns`` is ``time.monotonic_ns()``: CLOCK_MONOTONIC is system-wide on Linux, so
    a subscriber in another process can subtract it from its own reading. ``probe``
    marks the events of the latency phase (see :class:`DeliveryLog`).
    """
    event: dict[str, Any] = {"t": sent_ns, "seq": seq, "probe": int(probe), "pad": ""}
    event["pad"] = "x" * (PAYLOAD_BYTES - len(json.dumps(event, separators=(",", ":"))))
    return event


def compact_json(value: Any) -> bytes:
    """``value`` as compact JSON bytes, with the standard library (the raw sides' codec)."""
    return json.dumps(value, separators=(",", ":")).encode()


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0-100) of an already sorted sequence."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def process_cpu_s(pid: int | None = None) -> float:
    """CPU time (user + system) a process has used so far, in seconds; this one by default.

    Reading another process's ``/proc/<pid>/stat`` needs no cooperation from it, so the
    bench process can charge a server's CPU to exactly the measured window. CPU per
    call, unlike calls/s, barely moves when other programs load the machine.
    """
    if pid is None:
        return time.process_time()
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Published:
    """What a burst of publishes measured at the publisher."""

    started_ns: int
    """``time.monotonic_ns()`` before the first publish."""
    ended_ns: int
    """``time.monotonic_ns()`` once the last publish was confirmed."""
    cpu_s: float
    """CPU seconds the publishing process spent meanwhile."""


class CpuWindow:
    """The CPU time a process uses from this object's creation to :meth:`used_s`.

    With ``pid=None`` (nothing to measure, e.g. no local broker) it measures nothing.
    """

    def __init__(self, pid: int | None) -> None:
        self._pid = pid
        self._start = None if pid is None else process_cpu_s(pid)

    def used_s(self) -> float | None:
        """CPU seconds used so far in the window, or ``None`` when not measured."""
        if self._pid is None or self._start is None:
            return None
        return process_cpu_s(self._pid) - self._start


@dataclass(frozen=True, slots=True)
class DriveResult:
    """What :func:`drive` measured."""

    calls: int
    elapsed_s: float
    latencies_s: list[float]
    cpu_s: float
    """CPU time this process used meanwhile."""
    server_cpu_s: float | None = None
    """CPU time the server process used meanwhile, when its pid was given."""
    broker_cpu_s: float | None = None
    """CPU time the broker (``beam.smp``) used meanwhile, when its pid was given."""

    def metrics(self) -> dict[str, float]:
        """calls/s, p50/p99 latency in ms, and CPU microseconds per call (client, server
        and broker, where measured)."""
        ordered = sorted(self.latencies_s)
        metrics = {
            "calls_per_s": self.calls / self.elapsed_s,
            "p50_ms": percentile(ordered, 50) * 1000,
            "p99_ms": percentile(ordered, 99) * 1000,
            "client_cpu_us": self.cpu_s / self.calls * 1e6,
        }
        if self.server_cpu_s is not None:
            metrics["server_cpu_us"] = self.server_cpu_s / self.calls * 1e6
        if self.broker_cpu_s is not None:
            metrics["broker_cpu_us"] = self.broker_cpu_s / self.calls * 1e6
        return metrics


async def drive(
    call: Callable[[], Awaitable[object]],
    *,
    calls: int,
    concurrency: int,
    server_pid: int | None = None,
    broker_pid: int | None = None,
) -> DriveResult:
    """Run ``call()`` ``calls`` times from ``concurrency`` loops and time each call.

    ``call`` must raise when the call failed, so errors never count as fast answers.
    With ``server_pid`` (``broker_pid``), the server's (broker's) CPU time over the
    same window is measured too.
    """
    latencies = [0.0] * calls
    issued = 0
    clock = time.perf_counter

    async def loop() -> None:
        nonlocal issued
        while issued < calls:
            index = issued
            issued += 1
            started = clock()
            await call()
            latencies[index] = clock() - started

    server_cpu, broker_cpu = CpuWindow(server_pid), CpuWindow(broker_pid)
    cpu = process_cpu_s()
    started = clock()
    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, calls)):
            group.create_task(loop())
    elapsed = clock() - started
    return DriveResult(
        calls=calls,
        elapsed_s=elapsed,
        latencies_s=latencies,
        cpu_s=process_cpu_s() - cpu,
        server_cpu_s=server_cpu.used_s(),
        broker_cpu_s=broker_cpu.used_s(),
    )


def find_broker_pid(url: str) -> tuple[int | None, str]:
    """The pid of the RabbitMQ node behind ``url`` (its ``beam.smp``), or ``(None, why)``.

    Only a broker on this machine can be measured: the node is asked with
    ``rabbitmqctl eval 'os:getpid().'``, else the one ``beam.smp`` process is looked
    up with ``pgrep``; either way its ``/proc/<pid>/stat`` must be readable.
    """
    host = urllib.parse.urlsplit(url).hostname or ""
    if host not in ("localhost", "127.0.0.1", "::1"):
        return None, f"the broker ({host}) is not on this machine"
    found: list[str] = []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["rabbitmqctl", "eval", "os:getpid()."],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        found = [done.stdout.strip().strip('"')]
    if not found or not found[0].isdigit():
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(
                ["pgrep", "-f", "beam.smp"], capture_output=True, text=True, timeout=10
            )
            found = done.stdout.split()
    if len(found) != 1 or not found[0].isdigit():
        return None, f"no single beam.smp process found ({found or 'none'})"
    pid = int(found[0])
    try:
        process_cpu_s(pid)
    except (OSError, ValueError, IndexError) as exc:
        return None, f"cannot read /proc/{pid}/stat: {exc}"
    return pid, ""


def uvloop_available() -> bool:
    """True if uvloop can be imported in this interpreter."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def run_loop(main: Coroutine[Any, Any, T], *, use_uvloop: bool) -> T:
    """Run ``main`` on a new event loop: uvloop's when asked (and installed), else asyncio's."""
    if use_uvloop and uvloop_available():
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    with asyncio.Runner() as runner:
        return runner.run(main)


def rss_bytes() -> int:
    """This process's resident set size (``VmRSS`` of ``/proc/self/status``), in bytes."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError("no VmRSS in /proc/self/status (Linux only)")


# -- names both sides of a case agree on -----------------------------------------------

RAW_REQUESTS_EXCHANGE = "raw.requests"
"""The raw baseline's direct exchange for requests (ours uses the library's ``agents``)."""
MAX_PRIORITY = 9
"""``x-max-priority`` of the library's agent queues (``Topology.max_priority``)."""
QUEUE_ARGUMENTS: dict[str, Any] = {"x-max-priority": MAX_PRIORITY}
"""Request queues of every side are declared like the library's agent queues."""
EVENT_ROUTING_KEY = "bench.event"
EVENT_BINDING = "bench.#"


def group_queue(exchange: str, group: int) -> str:
    """The durable queue of subscriber group ``group`` of an events exchange."""
    return f"{exchange}.g{group}"


class DeliveryLog:
    """What an events server measures, in two phases.

    Throughput: ``expected`` events per group, published as fast as possible;
    ``complete`` is set when every group has them all. Latency: then ``probes``
    events per group, published one at a time, each marked ``probe`` and timed from
    publish to handler; ``probed`` is set when every group has them all. Timing the
    probes alone keeps queueing behind the throughput burst out of the latency.
    """

    def __init__(self, groups: int, expected: int, probes: int) -> None:
        self._received = [0] * groups
        self._probed = [0] * groups
        self._expected = expected
        self._probes = probes
        self._filling = groups
        self._probing = groups
        self._latencies_ns: list[int] = []
        self.last_ns = 0
        self.complete = asyncio.Event()
        self.probed = asyncio.Event()

    def record(self, group: int, event: dict[str, Any]) -> None:
        """One delivery of ``event`` (an :func:`event_payload`) to ``group``."""
        now = time.monotonic_ns()
        if event["probe"]:
            self._latencies_ns.append(now - event["t"])
            self._probed[group] += 1
            if self._probed[group] == self._probes:
                self._probing -= 1
                if not self._probing:
                    self.probed.set()
            return
        self._received[group] += 1
        if self._received[group] == self._expected:
            self._filling -= 1
            if not self._filling:
                self.last_ns = now
                self.complete.set()

    def throughput(self) -> dict[str, float]:
        """Deliveries of the throughput phase and the last one's time."""
        return {"count": sum(self._received), "last_ns": self.last_ns}

    def latency(self) -> dict[str, float]:
        """p50/p99 publish-to-handler latency of the probes, in ms."""
        ordered = sorted(self._latencies_ns)
        return {"p50_ms": percentile(ordered, 50) / 1e6, "p99_ms": percentile(ordered, 99) / 1e6}

    async def report(self) -> None:
        """Tell the bench process: ``done`` after the burst, ``probed`` after the probes."""
        from benchmarks.proc import emit

        await self.complete.wait()
        emit("done", **self.throughput())
        await self.probed.wait()
        emit("probed", **self.latency())
