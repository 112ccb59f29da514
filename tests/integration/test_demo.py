"""The demo on the real broker, in a vhost of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from amqp_agents.cli import main
from amqp_agents.testing import url_for_vhost
from tests.agents_for_tests import ROOT


def test_demo_on_rabbitmq_exits_zero(
    broker_url: str, fresh_vhost: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`amqp-agents --url amqp://... demo` runs the same transcript on RabbitMQ."""
    assert main(["--url", url_for_vhost(broker_url, fresh_vhost), "demo"]) == 0
    out = capsys.readouterr().out
    assert "amqp-agents demo on amqp://guest:***@" in out
    assert "   1. HIGH: the server is down" in out
    assert "   dropped unstarted: worker.stats.expired = 1" in out
    assert "every reply was as expected" in out


@pytest.mark.slow
def test_scripts_demo_on_a_fresh_checkout_prints_only_its_own_output(tmp_path: Path) -> None:
    """A copy of the tracked files with no .venv: scripts/demo installs the runtime
    dependencies only (no dev tools), shows none of pip's or setuptools' output, and
    runs the demo (exit 0)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30
    ).stdout.decode()
    checkout = tmp_path / "checkout"
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():  # a file deleted but not yet committed is skipped
            target = checkout / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    env = {key: value for key, value in os.environ.items() if not key.startswith("AMQP_")}
    env.pop("VIRTUAL_ENV", None)
    done = subprocess.run(
        ["scripts/demo"],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == (
        "demo: installing amqp-agents into .venv (runtime dependencies only)...\n"
    ), done.stderr
    assert done.stdout.startswith("amqp-agents demo on memory://")
    assert done.stdout.rstrip().endswith("demo finished: every reply was as expected")
    assert not (checkout / ".venv" / "bin" / "ruff").exists()  # no dev tools
    assert not (checkout / ".venv" / "bin" / "mypy").exists()
