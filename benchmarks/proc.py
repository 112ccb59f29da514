"""Server sides in processes of their own, and how they talk to the bench process.

The protocol is deliberately small: the child prints one JSON object per line on
stdout (``{"event": "ready"}`` once it consumes, ``{"event": "done", ...}`` with its
measurements where a case needs them) and stops gracefully when its stdin reaches EOF.
Its stderr goes to a file that is shown when it fails.

Standard library only: the FastStream side uses this under another virtualenv.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Self

from benchmarks.common import BenchError, run_loop

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "REPO_ROOT",
    "ServerMain",
    "ServerProcess",
    "child_main",
    "emit",
    "server_parser",
    "stdin_closed",
]

REPO_ROOT = Path(__file__).resolve().parent.parent

# -- in the child -------------------------------------------------------------------


def ready() -> None:
    """Tell the bench process the server is ready, its start-up heap frozen first.

    ``amqp-agents run`` freezes what start-up made (``gc.freeze()``) so full garbage
    collections do not walk it; every server side does the same here, so none of them
    pays 10-40 ms stalls that a careful deployment would not (see
    :func:`amqp_agents.cli.worker._freeze_startup_heap`).
    """
    gc.collect()
    gc.freeze()
    emit("ready")


def emit(event: str, **fields: Any) -> None:
    """Tell the bench process something: one JSON line on stdout."""
    print(json.dumps({"event": event, **fields}), flush=True)


async def stdin_closed() -> None:
    """Return when the bench process closes our stdin: the signal to stop."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(4096):
        pass


def server_parser(prog: str) -> argparse.ArgumentParser:
    """The arguments every server side takes (cases add their own)."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("kind", help="which server to run")
    parser.add_argument("--url", required=True, help="broker URL, with the run's vhost")
    parser.add_argument("--name", required=True, help="queue/agent/exchange name to use")
    parser.add_argument("--n", type=int, default=0, help="messages to expect (per group)")
    parser.add_argument("--groups", type=int, default=1, help="subscriber groups (events)")
    parser.add_argument("--probes", type=int, default=0, help="latency probes per group (events)")
    parser.add_argument("--prefetch", type=int, default=100)
    parser.add_argument("--uvloop", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--profile", type=Path, default=None, help="write cProfile stats here")
    return parser


ServerMain = Callable[[argparse.Namespace], Coroutine[Any, Any, None]]


def child_main(servers: dict[str, ServerMain], prog: str) -> None:
    """Parse the arguments, then run the named server (under cProfile if asked)."""
    args = server_parser(prog).parse_args()
    server = servers.get(args.kind)
    if server is None:
        raise SystemExit(f"unknown server {args.kind!r}; known: {', '.join(sorted(servers))}")
    if args.profile is None:
        run_loop(server(args), use_uvloop=args.uvloop)
        return
    profiler = cProfile.Profile(time.process_time)  # CPU time: fair on a loaded machine
    profiler.enable()
    try:
        run_loop(server(args), use_uvloop=args.uvloop)
    finally:
        profiler.disable()
        profiler.dump_stats(args.profile)


# -- in the bench process -----------------------------------------------------------


class ServerProcess:
    """A server side running in a child process, started and stopped as a context.

    ``async with ServerProcess(...) as server`` returns once the child said ``ready``;
    leaving the block closes its stdin and waits for a clean exit (killing it after
    ``stop_timeout_s``). A child that dies early raises :class:`BenchError` with the
    end of its stderr.
    """

    def __init__(
        self,
        label: str,
        module: str,
        args: list[str],
        *,
        python: str = sys.executable,
        ready_timeout_s: float = 60.0,
        stop_timeout_s: float = 60.0,
    ) -> None:
        self.label = label
        self._argv = [python, "-m", module, *args]
        self._ready_timeout_s = ready_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        """The child's process id."""
        assert self._proc is not None
        return self._proc.pid

    async def __aenter__(self) -> Self:
        self._stderr = tempfile.TemporaryFile()  # closed in __aexit__
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        self._proc = await asyncio.create_subprocess_exec(
            *self._argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._stderr,
            cwd=REPO_ROOT,
            env=env,
        )
        try:
            await self.event("ready", timeout_s=self._ready_timeout_s)
        except BaseException:
            await self._kill()
            raise
        return self

    async def event(self, name: str, *, timeout_s: float) -> dict[str, Any]:
        """Wait for the child's next ``name`` event and return its fields."""
        assert self._proc is not None
        assert self._proc.stdout is not None
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    line = await self._proc.stdout.readline()
                    if not line:
                        await self._proc.wait()
                        raise BenchError(
                            f"{self.label} exited ({self._proc.returncode}) before"
                            f" {name!r}:\n{self._stderr_tail()}"
                        )
                    with contextlib.suppress(ValueError):
                        message = json.loads(line)
                        if isinstance(message, dict) and message.get("event") == name:
                            return message
        except TimeoutError:
            raise BenchError(
                f"{self.label} sent no {name!r} within {timeout_s:g}s:\n{self._stderr_tail()}"
            ) from None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        proc = self._proc
        assert proc is not None
        assert proc.stdin is not None
        try:
            proc.stdin.close()
            try:
                async with asyncio.timeout(self._stop_timeout_s):
                    await proc.wait()
            except TimeoutError:
                await self._kill()
                if exc is None:
                    raise BenchError(f"{self.label} did not stop; killed") from None
            if proc.returncode != 0 and exc is None:
                raise BenchError(
                    f"{self.label} exited with {proc.returncode}:\n{self._stderr_tail()}"
                )
        finally:
            if self._stderr is not None:
                self._stderr.close()

    async def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()

    def _stderr_tail(self, limit: int = 4000) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-limit:]
