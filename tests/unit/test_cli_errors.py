"""Every mistake a newcomer made in their first hour ends in exit code 2 and one clear
line on stderr, never a traceback (issue 18). Each runs the real command in a process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.agents_for_tests import ROOT, cli_env, run_cli

UNREACHABLE_URL = "amqp://guest:guest@127.0.0.1:1/"
"""Nothing listens on port 1: a command that connects by mistake fails with exit 1."""

BAD_AGENTS = '''
from pydantic import BaseModel

from amqp_agents import Agent, action


class Bare(Agent):
    name = "bare"

    @action
    async def ping(self) -> None:
        """@action without parentheses."""


BARE = Bare
'''

EMPTY_AGENT = """
from amqp_agents import Agent


class Empty(Agent):
    name = "empty"
"""

INT_PAYLOAD = """
from amqp_agents import Agent, action


class Counter(Agent):
    name = "counter"

    @action("add")
    async def add(self, payload: int) -> int:
        return payload + 1
"""


def assert_one_clear_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit code 2, nothing on stdout, one line on stderr holding every needle."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["call", "a", "b", "--timeout", "inf"], ["--timeout", "between 0.001 and 86400"]),
        (["call", "a", "b", "--timeout", "1e10"], ["--timeout", "not 1e10"]),
        (["call", "a", "b", "--timeout", "nan"], ["--timeout"]),
        (["--log-level", "LOUD", "call", "a", "b"], ["--log-level", "invalid choice: 'LOUD'"]),
        (["call", "a", "b", "--log-level", "LOUD"], ["--log-level", "invalid choice: 'LOUD'"]),
        (["listen", "x", "--duration", "-1"], ["--duration", "at least"]),
        (["listen", "x", "--count", "0"], ["--count", "at least 1"]),
        (["dead-letters", "a", "--replay", "0"], ["--replay", "at least 1"]),
        (["call", "a", "b", "--priority", "10"], ["--priority"]),
        (["call", "a", "b", "@/nonexistent/payload.json"], ["cannot read the payload file"]),
        (["run", "amqp_agents.examples.tasks:app", "--log-json", "--nope"], ["--nope"]),
        ([], ["required: COMMAND"]),
    ],
)
def test_usage_mistakes_exit_2_with_one_line(args: list[str], needles: list[str]) -> None:
    """Bad options are refused before anything connects (the URL is unreachable)."""
    result = run_cli("--url", UNREACHABLE_URL, *args, env=cli_env())
    assert_one_clear_line(result, *needles)


def test_invalid_setting_is_one_line_without_pydantic_links() -> None:
    """A bad environment setting names itself; no "For further information" tail."""
    result = run_cli(
        "call", "a", "b", env=cli_env(AMQP_AGENTS_WORKER__CONCURRENCY="0", AMQP_URL=UNREACHABLE_URL)
    )
    assert_one_clear_line(result, "configuration error: worker.concurrency:", "greater than")
    assert "errors.pydantic.dev" not in result.stderr


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("amqp://h:1/,amqps://h:2/", "all use amqp:// or all amqps://"),
        ("amqp://h:99999/", "invalid port"),
        ("amqp://h:1/,memory://", "memory:// is one in-process broker"),
    ],
)
def test_a_bad_amqp_url_in_the_environment_is_one_line(url: str, needle: str) -> None:
    """AMQP_URL is read when the settings are, not when the package is imported: a bad
    one (or a bad list of cluster nodes) is a configuration error, not a traceback."""
    result = run_cli("call", "a", "b", env=cli_env(AMQP_URL=url))
    assert_one_clear_line(result, "configuration error: url:", needle)


@pytest.mark.parametrize(
    ("source", "target", "needles"),
    [
        (BAD_AGENTS, "bad_agents:BARE", ['write @action("...") above Bare.ping']),
        (EMPTY_AGENT, "empty_agent:Empty", ["Empty (agent 'empty') has no actions"]),
        (INT_PAYLOAD, "int_payload:Counter", ["can never accept a JSON object"]),
    ],
)
def test_agents_that_could_never_serve_do_not_start(
    tmp_path: Path, source: str, target: str, needles: list[str]
) -> None:
    """`run` refuses them before connecting: exit 2, one line naming the problem."""
    module = target.split(":")[0]
    (tmp_path / f"{module}.py").write_text(source)
    env = cli_env(PYTHONPATH=f"{tmp_path}:{ROOT}")
    result = run_cli("--url", UNREACHABLE_URL, "run", target, env=env)
    assert_one_clear_line(result, "configuration error", *needles)


def test_payload_from_stdin_and_file_reach_the_json_check(tmp_path: Path) -> None:
    """`-` reads stdin and `@FILE` a file: bad JSON from either is reported as such."""
    (tmp_path / "bad.json").write_text("{nope")
    from_file = run_cli(
        "--url", UNREACHABLE_URL, "call", "a", "b", f"@{tmp_path}/bad.json", env=cli_env()
    )
    assert_one_clear_line(from_file, "the payload is not valid JSON")
    from_stdin = subprocess.run(
        [sys.executable, "-m", "amqp_agents", "--url", UNREACHABLE_URL, "call", "a", "b", "-"],
        input="[1, 2]",
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=ROOT,
        timeout=20,
        check=False,
    )
    assert_one_clear_line(from_stdin, "the payload must be a JSON object")


def test_an_unreachable_broker_is_one_line_without_aiormq_noise() -> None:
    """aiormq's own ERROR line no longer precedes our "cannot connect" (exit 1)."""
    result = run_cli("--url", UNREACHABLE_URL, "call", "a", "b", env=cli_env())
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "cannot connect to amqp://guest:***@127.0.0.1:1/" in lines[0]


def test_global_options_work_after_the_command_too() -> None:
    """`call ... --url X --log-level DEBUG` equals `--url X --log-level DEBUG call ...`:
    with DEBUG, aiormq's lines come back (the option took effect)."""
    before = run_cli(
        "--url", UNREACHABLE_URL, "--log-level", "debug", "call", "a", "b", env=cli_env()
    )
    after = run_cli(
        "call", "a", "b", "--url", UNREACHABLE_URL, "--log-level", "debug", env=cli_env()
    )
    for result in (before, after):
        assert result.returncode == 1
        assert "127.0.0.1:1" in result.stderr
        assert "aiormq" in result.stderr


def test_version_and_help_explain_the_cli() -> None:
    """--version prints the version; --help lists examples, global options and exit codes."""
    version = run_cli("--version", env=cli_env())
    assert version.returncode == 0
    assert version.stdout.startswith("amqp-agents 0.")
    help_text = " ".join(run_cli("--help", env=cli_env()).stdout.split())
    for needle in ("examples:", "exit codes:", "before or after the command", "130"):
        assert needle in help_text
    call_help = " ".join(run_cli("call", "--help", env=cli_env()).stdout.split())
    assert "(default: 4)" in call_help
    assert "@FILE" in call_help
    run_help = " ".join(run_cli("run", "--help", env=cli_env()).stdout.split())
    for needle in ("--metrics-host", "(default: $AMQP_AGENTS_WORKER__CONCURRENCY, else 16)"):
        assert needle in run_help
