"""ProcessGroup with tiny stand-in children (no broker): restarts, crash loops, signals.

Each child is a few lines of Python whose behaviour on SIGTERM is chosen per test; it
appends its pid to a file once its handler is installed, which is what the tests wait for.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from amqp_agents.cli import main
from amqp_agents.cli.parent import child_command
from amqp_agents.cli.parser import build_parser
from amqp_agents.runtime.processes import Child, ProcessGroup
from tests.agents_for_tests import alive
from tests.support import wait_until

CHILD = r"""
import os, signal, sys
mode = os.environ["MODE"]
if mode == "crash":
    sys.exit(3)
seen = []
def on_term(signum, frame):
    seen.append(signum)
    with open(os.environ["READY"] + ".signals", "a") as signals:
        signals.write(f"{signum}\n")
    if mode == "graceful":
        sys.exit(0)
    if mode == "twice" and len(seen) == 2:
        sys.exit(128 + signum)
signal.signal(signal.SIGTERM, on_term)
with open(os.environ["READY"], "a") as ready:
    ready.write(f"{os.getpid()}\n")
while True:
    signal.pause()
"""


def group(tmp_path: Path, modes: Sequence[str], **options: Any) -> ProcessGroup:
    """A group whose child ``i`` runs :data:`CHILD` in ``modes[i]``."""

    def environment(child: Child) -> dict[str, str]:
        return {**os.environ, "MODE": modes[child.index], "READY": str(tmp_path / "ready")}

    settings: dict[str, Any] = {"grace_period_s": 5.0, "backoff_initial_s": 0.05, **options}
    return ProcessGroup(
        len(modes),
        lambda _child: [sys.executable, "-c", CHILD],
        environment=environment,
        ports=False,
        **settings,
    )


def started(tmp_path: Path) -> list[int]:
    """Pids of the children that installed their handler, in order."""
    path = tmp_path / "ready"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


async def wait_started(tmp_path: Path, count: int) -> list[int]:
    """The pids once ``count`` children (restarts included) have started."""

    def enough() -> list[int]:
        pids = started(tmp_path)
        return pids if len(pids) >= count else []

    return await wait_until(enough, timeout_s=20, what=f"{count} child(ren) to start")


async def test_first_signal_is_forwarded_and_every_child_stops_gracefully(
    tmp_path: Path,
) -> None:
    processes = group(tmp_path, ["graceful", "graceful"])
    running = asyncio.create_task(processes.run())
    pids = await wait_started(tmp_path, 2)
    processes.stop(signal.SIGTERM)
    assert await asyncio.wait_for(running, 10) == 0
    assert [child.last_exit for child in processes.children] == [0, 0]
    assert not any(alive(pid) for pid in pids)


async def test_second_signal_stops_at_once_and_the_exit_code_says_so(tmp_path: Path) -> None:
    processes = group(tmp_path, ["twice"])
    running = asyncio.create_task(processes.run())
    (pid,) = await wait_started(tmp_path, 1)
    processes.stop(signal.SIGTERM)
    signals = tmp_path / "ready.signals"
    await wait_until(signals.exists, timeout_s=10, what="the child to get the first signal")
    assert alive(pid)  # it ignores the first one
    processes.stop(signal.SIGTERM)
    assert await asyncio.wait_for(running, 10) == 128 + signal.SIGTERM
    assert processes.children[0].last_exit == 128 + signal.SIGTERM


async def test_a_killed_child_is_started_again_and_liveness_holds(tmp_path: Path) -> None:
    processes = group(tmp_path, ["graceful", "graceful"])
    running = asyncio.create_task(processes.run())
    try:
        first = await wait_started(tmp_path, 2)
        killed = next(child for child in processes.children if child.pid == first[0])
        os.kill(first[0], signal.SIGKILL)
        pids = await wait_started(tmp_path, 3)
        assert pids[2] not in first
        assert killed.pid == pids[2]
        assert [child.restarts for child in processes.children].count(0) == 1
        assert (killed.restarts, killed.last_exit) == (1, -signal.SIGKILL)
        assert processes.liveness_failure() is None  # one exit is not a crash loop
        processes.stop(signal.SIGTERM)
        assert await asyncio.wait_for(running, 10) == 0
    finally:
        running.cancel()
    assert not any(alive(pid) for pid in pids)


async def test_a_crash_loop_fails_liveness_then_the_group_gives_up_with_exit_1(
    tmp_path: Path,
) -> None:
    processes = group(tmp_path, ["crash", "graceful"], crash_limit=4, unhealthy_after=2)
    running = asyncio.create_task(processes.run())
    try:
        (healthy,) = await wait_started(tmp_path, 1)
        looping = await wait_until(processes.liveness_failure, timeout_s=20, what="a crash loop")
        assert looping is not None
        assert "process 0" in looping
        assert await asyncio.wait_for(running, 20) == 1
    finally:
        running.cancel()
    crashed, stayed = processes.children
    assert (crashed.crashes_in_a_row, crashed.restarts, crashed.last_exit) == (4, 3, 3)
    assert stayed.last_exit == 0  # stopped gracefully, not killed
    assert not alive(healthy)
    failure = processes.liveness_failure()
    assert failure is not None
    assert "exited 4 times in a row" in failure
    assert "gave up" in failure


async def test_a_child_that_outlives_the_grace_period_is_killed_and_the_exit_code_is_1(
    tmp_path: Path,
) -> None:
    processes = group(tmp_path, ["stubborn"], grace_period_s=0.2, stop_margin_s=0.3)
    running = asyncio.create_task(processes.run())
    (pid,) = await wait_started(tmp_path, 1)
    processes.stop(signal.SIGTERM)
    assert await asyncio.wait_for(running, 10) == 1
    assert processes.children[0].last_exit == -signal.SIGKILL
    assert not alive(pid)


async def test_a_cancelled_run_leaves_no_child_running(tmp_path: Path) -> None:
    processes = group(tmp_path, ["stubborn", "graceful"], stop_margin_s=5)
    running = asyncio.create_task(processes.run())
    pids = await wait_started(tmp_path, 2)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert not any(alive(pid) for pid in pids)
    assert len(started(tmp_path)) == 2  # and none was started again


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="unhealthy_after"):
        ProcessGroup(
            1,
            lambda _child: [],
            environment=lambda _child: {},
            ports=False,
            grace_period_s=1,
            crash_limit=2,
            unhealthy_after=3,
        )


# -- the command line ------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AMQP_"):
            monkeypatch.delenv(name)


def test_a_child_reruns_the_command_line_as_one_process_on_its_loopback_port() -> None:
    argv = ["--url", "amqp://h/", "run", "app:agents", "--processes", "4", "--metrics-port", "9"]
    command = child_command(argv, Child(2, port=40123))
    assert command[:3] == [sys.executable, "-m", "amqp_agents"]
    args = build_parser().parse_args(command[3:])  # the later options win
    assert (args.processes, args.metrics_port, args.metrics_host) == (1, 40123, "127.0.0.1")
    assert (args.url, args.target) == ("amqp://h/", "app:agents")
    assert child_command(["run", "app:agents"], Child(0))[3:] == [
        "run",
        "app:agents",
        "--processes",
        "1",
    ]


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--processes", "0"], "worker.processes"),
        (["--processes", "65"], "worker.processes"),
        (["--url", "memory://", "--processes", "2"], "memory:// lives in one process"),
    ],
)
def test_processes_that_cannot_work_fail_at_start_with_exit_2(
    options: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "amqp_agents.examples.tasks:app", *options]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.usefixtures("clean_env")
def test_a_bad_target_fails_in_the_parent_before_any_child_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["run", "no_such_module_here:app", "--processes", "2"]) == 2
    assert "cannot import 'no_such_module_here'" in capsys.readouterr().err
