"""Keep N worker processes running: restart the ones that die, forward stop signals.

The parent of ``amqp-agents run --processes N`` (see :mod:`amqp_agents.cli.parent`)::

    ProcessGroup (in the parent)
      ├── child 0: command(child 0)   restarted when it exits unasked
      └── child 1: command(child 1)

* **Restarts.** A child that exits while the group is not stopping is started again
  after an exponential backoff with full jitter (``backoff_initial_s`` doubling up to
  ``backoff_max_s``). An exit within ``stable_s`` of its start counts toward a crash loop:
  from ``unhealthy_after`` such exits in a row :meth:`ProcessGroup.liveness_failure`
  says so (the parent's ``/healthz`` fails, and an orchestrator restarts the set); at
  ``crash_limit`` the group gives up: it stops the other children gracefully and
  :meth:`ProcessGroup.run` returns 1. Every exit is logged with its code.
* **Stopping.** :meth:`ProcessGroup.stop` (the CLI calls it on SIGTERM and SIGINT)
  forwards the signal to every child: the first one stops a worker gracefully (in-flight
  work finishes within its grace period), the second at once (the broker requeues what
  was unacked). A child started while stopping gets the signal too. A child still running
  ``grace_period_s`` + ``stop_margin_s`` after the first signal is killed (SIGKILL).
  Children run in sessions of their own, so a terminal's Ctrl-C reaches the parent only
  and each child gets each signal exactly once.
* **Result.** :meth:`ProcessGroup.run` returns 0 after a graceful stop, 128 + signal
  after a second signal, 1 when it gave up on a crash loop or had to kill a child after
  the grace period; no child is left running however it ends (cancelled included).

Not covered: if the parent itself is killed with SIGKILL its children live on as
orphans; a process manager that kills the whole group (systemd's default
``KillMode=control-group``, a container's end) takes them down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

__all__ = ["STOP_MARGIN_S", "Child", "ProcessGroup"]

log = logging.getLogger(__name__)

STOP_MARGIN_S = 10.0
"""Beyond the grace period, how long a stopping child may take to exit before SIGKILL."""


@dataclass
class Child:
    """One slot of the group and what its current process is doing."""

    index: int
    port: int | None = None
    """Its loopback port for probes and metrics (chosen free at each start)."""
    pid: int | None = None
    """The running process, ``None`` while (re)starting or after it stopped."""
    restarts: int = 0
    """Processes started after the first one."""
    crashes_in_a_row: int = 0
    """Exits within ``stable_s`` of their start, since the last stable run."""
    last_exit: int | None = None
    """The last process's exit code (negative: killed by that signal)."""
    _process: asyncio.subprocess.Process | None = field(default=None, repr=False)


class ProcessGroup:
    """Keeps ``count`` processes of ``command(child)`` running until :meth:`stop`."""

    def __init__(
        self,
        count: int,
        command: Callable[[Child], Sequence[str]],
        *,
        environment: Callable[[Child], Mapping[str, str]],
        ports: bool,
        grace_period_s: float,
        crash_limit: int = 10,
        unhealthy_after: int = 3,
        stable_s: float = 30.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        stop_margin_s: float = STOP_MARGIN_S,
    ) -> None:
        if not 1 <= unhealthy_after <= crash_limit:
            raise ValueError("need 1 <= unhealthy_after <= crash_limit")
        self.children = [Child(index) for index in range(count)]
        self._command = command
        self._environment = environment
        self._ports = ports
        self._grace_period_s = grace_period_s
        self._crash_limit = crash_limit
        self._unhealthy_after = unhealthy_after
        self._stable_s = stable_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._stop_margin_s = stop_margin_s
        self._stopping = asyncio.Event()
        self._forwarded: int | None = None
        """The signal every child gets on stop (late starters too)."""
        self._signals: list[int] = []
        """The stop signals received (the exit code says whether there were two)."""
        self._gave_up: str | None = None
        self._killed = 0

    @property
    def stopping(self) -> bool:
        """A stop was asked for (a signal, or a crash loop the parent gave up on)."""
        return self._stopping.is_set()

    def liveness_failure(self) -> str | None:
        """Why the group cannot keep its children up (``/healthz`` 503), or ``None``."""
        if self._gave_up is not None:
            return self._gave_up
        for child in self.children:
            if child.crashes_in_a_row >= self._unhealthy_after:
                return (
                    f"process {child.index} is crash-looping: {child.crashes_in_a_row} exits"
                    f" in a row (last exit code {child.last_exit})"
                )
        return None

    def stop(self, signum: int) -> None:
        """Forward ``signum`` to every child: the first stops them gracefully, the second
        at once. For the loop's signal handlers (it never blocks)."""
        name = signal.Signals(signum).name
        running = [child for child in self.children if child.pid is not None]
        if not self._signals:
            log.info(
                "%s: stopping %d process(es) gracefully, up to %gs to finish"
                " (send it again to stop at once)",
                name,
                len(running),
                self._grace_period_s,
            )
        else:
            log.warning("%s again: stopping %d process(es) at once", name, len(running))
        self._signals.append(signum)
        self._forward_to_all(signum)

    def _forward_to_all(self, signum: int) -> None:
        if self._forwarded is None:
            self._forwarded = signum
        self._stopping.set()
        for child in self.children:
            self._send(child, signum)

    async def run(self) -> int:
        """Start the children, keep them up until stopped, wait for them; the exit code.

        Every child is gone when this returns, however it ends (cancelled included).
        """
        keepers = [asyncio.create_task(self._keep(child)) for child in self.children]
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            # A keeper ends only once stopping, unless it failed (a bug): then stop too.
            await asyncio.wait([stopping, *keepers], return_when=asyncio.FIRST_COMPLETED)
            for keeper in keepers:
                if keeper.done() and (error := keeper.exception()) is not None:
                    raise error
            _done, late = await asyncio.wait(
                keepers, timeout=self._grace_period_s + self._stop_margin_s
            )
            if late:
                alive = [child.index for child in self.children if child.pid is not None]
                log.error("process(es) %s still running after the grace period: killed", alive)
                self._killed = len(alive)
                self._kill_all()
                await asyncio.wait(keepers, timeout=self._stop_margin_s)
        finally:
            # Whatever ended the run (cancelled included): no child outlives it, and each
            # one is reaped by its keeper, which no longer restarts it.
            self._stopping.set()
            self._kill_all()
            await asyncio.wait(keepers, timeout=self._stop_margin_s)
            for task in (stopping, *keepers):
                task.cancel()
        if len(self._signals) > 1:
            return 128 + self._signals[-1]
        if self._gave_up is not None or self._killed:
            return 1
        log.info("%d process(es) stopped", len(self.children))
        return 0

    async def _keep(self, child: Child) -> None:
        """Run ``child``'s process again and again until the group stops."""
        while not self._stopping.is_set():
            child.port = _free_port() if self._ports else None
            try:
                process = await asyncio.create_subprocess_exec(
                    *self._command(child),
                    env=dict(self._environment(child)),
                    start_new_session=True,  # a terminal's Ctrl-C reaches the parent only
                )
            except OSError as exc:
                code = None
                log.error("process %d could not start: %s", child.index, exc)
                started = asyncio.get_running_loop().time()
            else:
                started = asyncio.get_running_loop().time()
                child.pid, child._process = process.pid, process
                log.info("process %d started (pid %d)", child.index, process.pid)
                if self._forwarded is not None:  # stopped while it was starting
                    self._send(child, self._forwarded)
                try:
                    code = await process.wait()
                finally:
                    child.pid = child._process = None
                child.last_exit = code
            if self._stopping.is_set():
                return
            lived_s = asyncio.get_running_loop().time() - started
            quick = lived_s < self._stable_s
            child.crashes_in_a_row = child.crashes_in_a_row + 1 if quick else 1
            if child.crashes_in_a_row >= self._crash_limit:
                self._give_up(child)
                return
            delay_s = self._backoff(child.crashes_in_a_row)
            log.warning(
                "process %d exited unexpectedly (exit code %s) after %.1fs;"
                " restarting in %.1fs (%d exit(s) in a row)",
                child.index,
                code,
                lived_s,
                delay_s,
                child.crashes_in_a_row,
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay_s):
                    await self._stopping.wait()
            if not self._stopping.is_set():
                child.restarts += 1

    def _give_up(self, child: Child) -> None:
        self._gave_up = (
            f"process {child.index} exited {child.crashes_in_a_row} times in a row within"
            f" {self._stable_s:g}s of starting (last exit code {child.last_exit}); gave up"
        )
        log.error("%s: stopping the others", self._gave_up)
        self._forward_to_all(signal.SIGTERM)

    def _backoff(self, failures: int) -> float:
        """Full jitter: uniform in [0, min(max, initial * 2**(failures-1))]."""
        ceiling = min(self._backoff_max_s, self._backoff_initial_s * 2 ** max(failures - 1, 0))
        return random.uniform(0, ceiling)  # noqa: S311  # jitter, not cryptography

    def _send(self, child: Child, signum: int) -> None:
        if child._process is not None and child._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child._process.send_signal(signum)

    def _kill_all(self) -> None:
        for child in self.children:
            self._send(child, signal.SIGKILL)


def _free_port() -> int:
    """A loopback port nothing listens on now (the child binds it a moment later; if
    another process takes it first, the child fails to start and is restarted on a new one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
