"""The README's code, run as a user would, so the README cannot drift from the code.

Every fenced ``python`` and ``toml`` block of README.md starts with a comment naming its
file (``# greeter.py``); the test writes them into an empty directory and runs them
there against a fresh vhost of the real broker: the worker command the README gives,
the scripts with ``python``, the pytest example with ``pytest`` under the README's own
``pyproject.toml``. Every ``amqp-agents`` command of an ``sh`` block is parsed by the
real argument parser, every ``scripts/...`` command must exist, and a command followed
by a ``# {...}`` line must print exactly that.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from amqp_agents.cli.parser import build_parser as _parser
from amqp_agents.testing import url_for_vhost
from tests.agents_for_tests import CLI, ROOT, cli_env, free_port
from tests.support import wait_until_sync

README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)
NAME = re.compile(r"# ([\w./-]+\.(?:py|toml))\n")


def blocks(language: str) -> list[str]:
    """The bodies of README.md's fenced blocks in ``language``, in order."""
    return [body for lang, body in FENCE.findall(README.read_text()) if lang == language]


def files() -> dict[str, str]:
    """File name -> text of every python and toml block (each must be named)."""
    named: dict[str, str] = {}
    for language in ("python", "toml"):
        for body in blocks(language):
            match = NAME.match(body)
            assert match, f"a README {language} block does not start with '# NAME':\n{body}"
            assert match.group(1) not in named, f"two README blocks are {match.group(1)}"
            named[match.group(1)] = body
    return named


def commands(body: str) -> list[tuple[list[str], str | None]]:
    """The commands of an sh block (continuations joined, environment assignments and
    comments dropped, pipelines and && split), each with the ``# output`` line that
    follows it in the block, if any."""
    lines = body.replace("\\\n", " ").splitlines()
    found: list[tuple[list[str], str | None]] = []
    for number, line in enumerate(lines):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] = []
        following = lines[number + 1] if number + 1 < len(lines) else ""
        output = following[2:] if following.startswith("# ") else None
        for token in [*lexer, "&&"]:
            if token in ("|", "&&", ";", "||"):
                while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                    words.pop(0)
                if words:
                    found.append((words, output if token == "&&" else None))
                words = []
            else:
                words.append(token)
    return found


def test_every_code_block_is_named_and_there_are_enough() -> None:
    """The file-name convention holds, and the blocks this test runs are all there."""
    assert set(files()) == {
        "greeter.py",
        "call_greeter.py",
        "traced_call.py",
        "events.py",
        "payments.py",
        "test_tasks.py",
        "pyproject.toml",
    }


def test_sh_blocks_use_commands_and_options_that_exist() -> None:
    """Each `amqp-agents ...` parses with the real CLI parser; each scripts/X exists."""
    seen = 0
    for body in blocks("sh"):
        for words, _output in commands(body):
            if words[0] == "amqp-agents":
                try:
                    _parser().parse_args(words[1:])
                except SystemExit as exc:
                    pytest.fail(f"README command does not parse ({exc.code}): {shlex.join(words)}")
                seen += 1
            elif words[0].startswith("scripts/"):
                script = ROOT / words[0]
                assert script.is_file(), f"README names {words[0]}, which does not exist"
                assert script.stat().st_mode & 0o111, f"{words[0]} is not executable"
            else:
                assert words[0] in {"echo"}, f"unexpected command in the README: {words}"
    assert seen >= 6


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty directory holding the README's files and a stand-in payment gateway."""
    for name, text in files().items():
        (tmp_path / name).write_text(text)
    shop = tmp_path / "shop"
    shop.mkdir()
    (shop / "__init__.py").write_text("")
    (shop / "gateway.py").write_text(
        "class GatewayDown(Exception): ...\n"
        "class RateLimited(Exception): ...\n"
        "class _Gateway:\n"
        "    async def charge(self, order: int, cents: int) -> str:\n"
        "        return f'receipt-{order}'\n"
        "gateway = _Gateway()\n"
    )
    (tmp_path / "ada.json").write_text('{"name": "Ada"}')
    return tmp_path


def run(args: list[str], cwd: Path, env: dict[str, str], stdin: str | None = None) -> str:
    """Run a command as a user would in ``cwd``; its stdout, or fail with its output."""
    done = subprocess.run(
        args,
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"{shlex.join(args)} exited {done.returncode}:\n{done.stderr}"
    return done.stdout


def test_readme_code_runs_against_the_broker(
    broker_url: str, fresh_vhost: str, workdir: Path
) -> None:
    """The worker command of "Run it" serves greeter.py; call_greeter.py, events.py, the
    CLI calls and payments.py work as shown; the pytest example passes under the README's
    pyproject.toml."""
    env = cli_env(pythonpath=False, AMQP_URL=url_for_vhost(broker_url, fresh_vhost))
    [(run_words, _)] = [
        (words, output)
        for body in blocks("sh")
        for words, output in commands(body)
        if words[:3] == ["amqp-agents", "run", "greeter:Greeter"]
    ]
    port = run_words.index("--metrics-port") + 1
    run_words[port] = str(free_port())  # the README's 9100 may be taken on this machine
    log = workdir / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [CLI, *run_words[1:]], cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:

        def consuming() -> bool:
            assert worker.poll() is None, log.read_text()
            return "consuming agents.greeter" in log.read_text()

        wait_until_sync(
            consuming, timeout_s=20, what=lambda: f"the greeter to consume:\n{log.read_text()}"
        )

        printed = run([sys.executable, "call_greeter.py"], workdir, env).splitlines()
        assert printed == [
            "True {'greeting': 'Hello, Ada!'} None",
            "NOT_FOUND nobody is not here",
            "[{'greeting': 'Hello, A!'}, {'greeting': 'Hello, B!'}, {'greeting': 'Hello, C!'}]",
        ]
        traced = run([sys.executable, "traced_call.py"], workdir, env).splitlines()
        assert traced == ["['greeter/greet', 'send agents:greeter']"]

        calls = [
            (words, output)
            for body in blocks("sh")
            for words, output in commands(body)
            if words[:3] == ["amqp-agents", "call", "greeter"]
        ]
        assert len(calls) == 3
        for words, output in calls:
            stdin = '{"name": "Ada"}' if words[-1] == "-" else None
            reply = run([CLI, *words[1:]], workdir, env, stdin)
            assert json.loads(reply) == {"ok": True, "data": {"greeting": "Hello, Ada!"}}
            if output is not None:
                assert reply.strip() == output
    finally:
        worker.terminate()
        code = worker.wait(20)
    assert code == 0, log.read_text()

    # The events may arrive before publish() returns: compare in any order.
    events = sorted(run([sys.executable, "events.py"], workdir, env).splitlines())
    got = "got task.created {'id': '42', 'title': 'write docs'}"
    assert events[:2] == [got, got]
    assert re.fullmatch(r"published \S+", events[2]), events

    run(
        [sys.executable, "-c", "import payments; assert 'charge' in payments.Payments.actions()"],
        workdir,
        env,
    )

    report = run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_tasks.py"],
        workdir,
        env,
    )
    assert re.search(r"^2 passed", report, re.M), report
