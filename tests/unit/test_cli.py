"""CLI helpers that need no broker: loading agents, building settings, early exits."""

import asyncio
import gc
import logging
import os
import sys
import types
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from amqp_agents.cli import app, load_agents, main
from amqp_agents.cli.app import _loop_factory, _run_bounded
from amqp_agents.cli.app import settings_from as _settings
from amqp_agents.cli.parser import build_parser as _parser
from amqp_agents.errors import ConfigurationError
from amqp_agents.examples.planner import Planner
from amqp_agents.examples.tasks import AuditAgent, TaskManager
from amqp_agents.runtime.agent import Agent, action

MODULE = "fake_agents_for_cli"
UNREACHABLE_URL = "amqp://guest:guest@127.0.0.1:1/"
"""Nothing listens on port 1: a command that connects by mistake fails at once."""


class Alpha(Agent):
    """A minimal agent."""

    name = "alpha"

    @action("ping")
    async def ping(self) -> None:
        """Answers with nothing."""


class Beta(Agent):
    """Another minimal agent."""

    name = "beta"

    @action("ping")
    async def ping(self) -> None:
        """Answers with nothing."""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run without any AMQP_* variable from the developer's or CI's environment."""
    for name in list(os.environ):
        if name.startswith("AMQP_"):
            monkeypatch.delenv(name)


@pytest.fixture
def module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """An importable module ``fake_agents_for_cli`` holding every kind of target."""
    fake = types.ModuleType(MODULE)
    fake.instance = Alpha()  # type: ignore[attr-defined]
    fake.cls = Alpha  # type: ignore[attr-defined]
    fake.listed = [Alpha(), Beta]  # type: ignore[attr-defined]
    fake.tupled = (Alpha(),)  # type: ignore[attr-defined]
    fake.factory = lambda: [Alpha(), Beta()]  # type: ignore[attr-defined]
    fake.single_factory = lambda: Beta()  # type: ignore[attr-defined]
    fake.class_factory = lambda: Beta  # type: ignore[attr-defined]
    fake.empty = []  # type: ignore[attr-defined]
    fake.number = 42  # type: ignore[attr-defined]
    fake.mixed = [Alpha(), "beta"]  # type: ignore[attr-defined]
    fake.returns_none = lambda: None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, MODULE, fake)
    return fake


@pytest.fixture
def _restore_logging() -> Iterator[None]:
    """Undo main()'s logging.basicConfig so other tests see the root logger unchanged."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


# -- load_agents ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attr", "names"),
    [
        ("instance", ["alpha"]),
        ("cls", ["alpha"]),
        ("listed", ["alpha", "beta"]),
        ("tupled", ["alpha"]),
        ("factory", ["alpha", "beta"]),
        ("single_factory", ["beta"]),
        ("class_factory", ["beta"]),
    ],
)
def test_load_agents_forms(module: types.ModuleType, attr: str, names: list[str]) -> None:
    """An instance, a class, a list/tuple, or a callable returning one all load as agents."""
    agents = load_agents(f"{MODULE}:{attr}")

    assert [agent.name for agent in agents] == names
    assert all(isinstance(agent, Agent) for agent in agents)


def test_load_agents_returns_the_instance_itself(module: types.ModuleType) -> None:
    """A module-level instance is used as is, not copied or re-created."""
    assert load_agents(f"{MODULE}:instance") == [module.instance]


def test_load_agents_example_app() -> None:
    """The documented example target loads the example agents."""
    agents = load_agents("amqp_agents.examples.tasks:app")

    assert [type(agent) for agent in agents] == [TaskManager, AuditAgent, Planner]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_colon", "expected MODULE:ATTR, got 'no_colon'"),
        (":attr", "expected MODULE:ATTR"),
        (f"{MODULE}:", "expected MODULE:ATTR"),
        ("surely_not_a_module_xyz:app", "cannot import 'surely_not_a_module_xyz'"),
        (f"{MODULE}:ghost", f"module '{MODULE}' has no attribute 'ghost'"),
        (f"{MODULE}:number", "gave 42, which is not an Agent"),
        (f"{MODULE}:mixed", "gave 'beta', which is not an Agent"),
        (f"{MODULE}:returns_none", "gave None, which is not an Agent"),
        (f"{MODULE}:empty", "names no agents"),
    ],
)
def test_load_agents_bad_targets(module: types.ModuleType, target: str, message: str) -> None:
    """Each bad target raises ConfigurationError saying what is wrong with it."""
    with pytest.raises(ConfigurationError) as caught:
        load_agents(target)

    assert message in str(caught.value)


# -- settings from arguments ----------------------------------------------------------


def test_settings_apply_cli_overrides() -> None:
    """--url, --concurrency and --grace-period override the defaults and reach the groups."""
    url = "amqp://app:pw@broker/"
    args = _parser().parse_args(
        ["--url", url, "run", "m:a", "--concurrency", "3", "--grace-period", "1.5"]
    )

    settings = _settings(args)

    assert settings.url.get_secret_value() == url
    assert settings.connection.url.get_secret_value() == url
    assert settings.worker.concurrency == 3
    assert settings.worker.grace_period_s == 1.5


def test_settings_validate_cli_overrides() -> None:
    """An out-of-range --concurrency fails validation on that field."""
    args = _parser().parse_args(["run", "m:a", "--concurrency", "0"])

    with pytest.raises(ValidationError) as caught:
        _settings(args)
    assert caught.value.errors()[0]["loc"] == ("worker", "concurrency")


def test_settings_validate_cli_url() -> None:
    """A non-AMQP --url fails validation."""
    args = _parser().parse_args(["--url", "http://broker/", "call", "a", "b"])

    with pytest.raises(ValidationError, match="must start with amqp://"):
        _settings(args)


def test_connection_url_variable_is_rejected_not_silently_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """AMQP_AGENTS_CONNECTION__URL is refused with the variable to use, never dropped."""
    monkeypatch.setenv("AMQP_AGENTS_CONNECTION__URL", "amqp://app:pw@prod-broker/")

    with pytest.raises(ValidationError, match=r"set the broker URL with AMQP_URL"):
        _settings(_parser().parse_args(["call", "a", "b"]))


# -- main ------------------------------------------------------------------------------


@pytest.mark.usefixtures("_restore_logging")
@pytest.mark.parametrize(
    ("payload", "message"),
    [("{not json", "the payload is not valid JSON"), ("[1, 2]", "must be a JSON object")],
)
def test_call_with_bad_payload_exits_2(
    capsys: pytest.CaptureFixture[str], payload: str, message: str
) -> None:
    """`call` with a payload that is not a JSON object exits 2 before connecting."""
    code = main(["--url", UNREACHABLE_URL, "call", "task_manager", "task_add", payload])

    assert code == 2
    err = capsys.readouterr().err
    assert "configuration error" in err
    assert message in err


@pytest.mark.usefixtures("_restore_logging")
def test_bad_url_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """A non-AMQP --url exits 2 with a configuration error that hides the password."""
    code = main(["--url", "http://user:hunter2@broker/", "call", "a", "b"])

    assert code == 2
    err = capsys.readouterr().err
    assert "must start with amqp://" in err
    assert "hunter2" not in err


@pytest.mark.usefixtures("_restore_logging")
def test_bad_connection_url_variable_hides_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad URL in the nested environment variable is reported without its password."""
    monkeypatch.setenv("AMQP_AGENTS_CONNECTION__URL", "http://user:hunter2@broker/")

    code = main(["call", "a", "b"])

    assert code == 2
    assert "hunter2" not in capsys.readouterr().err


def test_missing_command_is_a_usage_error() -> None:
    """Running without a command exits with argparse's usage status 2."""
    with pytest.raises(SystemExit) as caught:
        main([])
    assert caught.value.code == 2


# -- the event loop ----------------------------------------------------------------------


def test_event_loop_auto_takes_uvloop_when_installed() -> None:
    """auto and uvloop give uvloop's loop (the dev extra installs it); asyncio gives none."""
    import uvloop

    assert _loop_factory("auto") is uvloop.new_event_loop
    assert _loop_factory("uvloop") is uvloop.new_event_loop
    assert _loop_factory("asyncio") is None


def test_event_loop_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without uvloop: auto falls back to asyncio; uvloop is a configuration error."""
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    assert _loop_factory("auto") is None
    with pytest.raises(ConfigurationError, match=r"pip install 'amqp-agents\[speed\]'"):
        _loop_factory("uvloop")


@pytest.mark.usefixtures("_restore_logging")
def test_event_loop_setting_is_validated(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """AMQP_AGENTS_EVENT_LOOP accepts auto, uvloop, asyncio; anything else exits 2."""
    monkeypatch.setenv("AMQP_AGENTS_EVENT_LOOP", "tokio")
    assert main(["--url", UNREACHABLE_URL, "call", "a", "b"]) == 2
    assert "event_loop: Input should be 'auto', 'uvloop' or 'asyncio'" in capsys.readouterr().err


def test_a_task_that_swallows_its_cancellation_does_not_hang_the_exit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A command returns while a task it left behind ignores cancellation (as a
    library's close can): the command's exit code comes back after the grace, with a
    warning, instead of the process never exiting (asyncio.Runner waits forever)."""
    monkeypatch.setattr(app, "_EXIT_GRACE_S", 0.2)
    cancelled = 0

    async def stubborn() -> None:
        nonlocal cancelled
        while cancelled < 1000:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled += 1

    async def command() -> int:
        asyncio.get_running_loop().create_task(stubborn())
        await asyncio.sleep(0)
        return 7

    assert _run_bounded(None, command()) == 7
    assert cancelled == 1
    assert "1 task(s) did not end at exit" in caplog.text


def test_a_worker_freezes_its_start_up_heap() -> None:
    """What start-up made is out of the cyclic collector's way (gc.freeze): full
    collections no longer walk it while serving (events' p99 latency, issue 20)."""
    from amqp_agents.cli.worker import _freeze_startup_heap

    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        _freeze_startup_heap()
        frozen = gc.get_freeze_count()
    finally:
        gc.unfreeze()
    assert frozen > 1000  # every module, schema and agent the process holds
