"""Agents that worker subprocesses load, and the helpers that run ``amqp-agents`` for tests.

A subprocess worker runs ``amqp-agents --url URL run tests.agents_for_tests:recorder`` and
is configured through environment variables (read when the CLI loads the target):

* ``AAT_AGENT_NAME``: the agent's name (unique per test);
* ``AAT_RECORD_PATH``: a file each handled request's ``id`` is appended to, one per line,
  when the handler finishes (before the reply and the ack);
* ``AAT_DELAY_MS``: ``"MIN,MAX"``, how long ``work`` takes (uniformly random).

``hold`` records its id when it starts and stays in flight until the process receives
SIGUSR1, which lets a test keep a request in flight across a SIGTERM.

The console script does not put the working directory on ``sys.path``, so
:func:`cli_env` adds the project root to ``PYTHONPATH`` for ``tests`` to be importable.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO

from pydantic import BaseModel

from amqp_agents.runtime.agent import Agent, action

ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).with_name("amqp-agents"))


class Work(BaseModel):
    """Payload of ``work``: the request's id, recorded when handled."""

    id: int


class Recorder(Agent):
    """Records every handled ``work`` request's id; ``hold`` stays in flight until SIGUSR1."""

    name = "recorder"

    def __init__(self, *, name: str, record_path: str, delay_ms: tuple[float, float]) -> None:
        super().__init__(name=name)
        self._record_path = record_path
        self._delay_ms = delay_ms
        self._fd = -1
        self._released = asyncio.Event()

    async def start(self) -> None:
        self._fd = os.open(self._record_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self._released.set)
        await super().start()

    async def shutdown(self) -> None:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        await super().shutdown()

    @action("work")
    async def work(self, payload: Work) -> Work:
        """Take a while, then record the id (one small O_APPEND write: atomic)."""
        await asyncio.sleep(random.uniform(*self._delay_ms) / 1000)
        os.write(self._fd, f"{payload.id}\n".encode())
        return payload

    @action("hold")
    async def hold(self, payload: Work) -> Work:
        """Record the id, then stay in flight until the process gets SIGUSR1 (at most 30 s)."""
        os.write(self._fd, f"{payload.id}\n".encode())
        async with asyncio.timeout(30):
            await self._released.wait()
        return payload


def recorder() -> list[Agent]:
    """The target ``tests.agents_for_tests:recorder``, configured from the environment."""
    low, high = (float(x) for x in os.environ.get("AAT_DELAY_MS", "5,20").split(","))
    return [
        Recorder(
            name=os.environ["AAT_AGENT_NAME"],
            record_path=os.environ["AAT_RECORD_PATH"],
            delay_ms=(low, high),
        )
    ]


# -- running the CLI -------------------------------------------------------------------


def cli_env(*, pythonpath: bool = True, **extra: str) -> dict[str, str]:
    """The environment for an ``amqp-agents`` subprocess: no inherited broker settings."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key != "AMQP_URL" and not key.startswith(("AMQP_AGENTS_", "AAT_"))
    }
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def read_ids(path: Path) -> list[int]:
    """The ids a :class:`Recorder` wrote to ``path`` (complete lines only)."""
    if not path.exists():
        return []
    text = path.read_text()
    return [int(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


class CliProcess:
    """A running ``amqp-agents`` subprocess; stdout and stderr go to files.

    Always end it with :meth:`close` (in a ``finally``): it kills a process that is
    still running after a bounded wait.
    """

    def __init__(self, args: list[str], *, env: dict[str, str], log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        stem = f"cli-{time.monotonic_ns()}"
        self.stdout_path = log_dir / f"{stem}.out"
        self.stderr_path = log_dir / f"{stem}.err"
        self._files: list[IO[bytes]] = [self.stdout_path.open("wb"), self.stderr_path.open("wb")]
        self.proc = subprocess.Popen(
            [CLI, *args], cwd=ROOT, env=env, stdout=self._files[0], stderr=self._files[1]
        )

    def output(self) -> str:
        """Everything written to stdout and stderr so far."""
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(
            errors="replace"
        )

    def running(self) -> bool:
        """True while the process runs; an ``AssertionError`` with its output once it exited."""
        code = self.proc.poll()
        if code is not None:
            raise AssertionError(f"amqp-agents exited early with {code}:\n{self.output()}")
        return True

    def terminate(self) -> None:
        """Send SIGTERM."""
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> int:
        """The exit code; ``subprocess.TimeoutExpired`` if still running after ``timeout_s``."""
        return self.proc.wait(timeout=timeout_s)

    async def await_exit(self, timeout_s: float) -> int:
        """:meth:`wait` off the event loop."""
        return await asyncio.to_thread(self.proc.wait, timeout_s)

    def close(self) -> None:
        """Kill the process if it still runs, reap it, close the log files."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        finally:
            for file in self._files:
                file.close()


def run_cli(
    *args: str, env: dict[str, str], timeout_s: float = 20.0, module: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run ``amqp-agents ARGS`` (or ``python -m amqp_agents ARGS``) to completion."""
    command = [sys.executable, "-m", "amqp_agents"] if module else [CLI]
    return subprocess.run(
        [*command, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def wait_until(predicate: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    """Poll ``predicate`` every 50 ms; fail the test if it is not true within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(0.05)


async def await_until(
    predicate: Callable[[], Awaitable[bool]], *, timeout_s: float, what: str
) -> None:
    """Async :func:`wait_until`: poll ``await predicate()`` every 20 ms, bounded."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(0.02)
