"""The ``amqp-agents`` command against the real broker: exit codes, output, secrets, env."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from amqp_agents.testing import BrokerAdmin, url_for_vhost
from tests.agents_for_tests import CliProcess, cli_env, run_cli
from tests.broker_env import broker_address
from tests.support import wait_until_sync

TASKS_QUEUE = "agents.task_manager"


def consumers(admin: BrokerAdmin, vhost: str, queue: str) -> int:
    """Consumers of ``queue`` as the broker reports them (0 if it does not exist)."""
    row = admin.list_queues(vhost).get(queue)
    return 0 if row is None else row.consumers


@pytest.fixture(scope="module")
def vhost_url(broker_url: str, module_vhost: str) -> str:
    """The module vhost's URL (guest credentials)."""
    return url_for_vhost(broker_url, module_vhost)


@pytest.fixture(scope="module")
def tasks_worker(
    vhost_url: str,
    module_vhost: str,
    broker_admin: BrokerAdmin,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[CliProcess]:
    """``amqp-agents run amqp_agents.examples.tasks:app`` in the module vhost, consuming."""
    worker = CliProcess(
        ["--url", vhost_url, "run", "amqp_agents.examples.tasks:app"],
        env=cli_env(),
        log_dir=tmp_path_factory.mktemp("tasks-worker"),
    )
    try:
        wait_until_sync(
            lambda: worker.running() and consumers(broker_admin, module_vhost, TASKS_QUEUE) == 1,
            timeout_s=20,
            what="the task_manager worker to consume",
        )
        yield worker
        worker.terminate()
        assert worker.wait(15) == 0, worker.output()
    finally:
        worker.close()


@pytest.fixture(scope="module")
def secret_user(broker_admin: BrokerAdmin, module_vhost: str) -> Iterator[tuple[str, str]]:
    """A broker user with a distinctive password, allowed on the module vhost."""
    user, password = f"cli-{uuid.uuid4().hex[:8]}", f"S3cretPa55-{uuid.uuid4().hex[:8]}"
    broker_admin.run("add_user", user, password)
    try:
        broker_admin.run("set_permissions", "-p", module_vhost, user, ".*", ".*", ".*")
        yield user, password
    finally:
        broker_admin.run("delete_user", user)


def with_credentials(url: str, user: str, password: str) -> str:
    """``url`` with its userinfo replaced."""
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{user}:{password}@{rest.split('@', 1)[1]}"


def test_call_prints_reply_and_exits_0(tasks_worker: CliProcess, vhost_url: str) -> None:
    """`call task_manager task_add` prints the JSON reply and exits 0."""
    done = run_cli(
        "--url", vhost_url, "call", "task_manager", "task_add", '{"title": "x"}', env=cli_env()
    )
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["ok"] is True
    assert reply["data"]["title"] == "x"
    assert reply["data"]["completed"] is False
    assert isinstance(reply["data"]["id"], str)


def test_call_error_reply_exits_1(tasks_worker: CliProcess, vhost_url: str) -> None:
    """An error reply (task_get of a missing id) prints NOT_FOUND and exits 1."""
    done = run_cli(
        "--url", vhost_url, "call", "task_manager", "task_get", '{"id": "987654"}', env=cli_env()
    )
    assert done.returncode == 1, done.stderr
    reply = json.loads(done.stdout)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "NOT_FOUND"


def test_call_unserved_agent_is_no_route_within_2s(
    vhost_url: str, unique: Callable[[str], str]
) -> None:
    """Calling an agent nobody serves prints NO_ROUTE and exits non-zero within 2 s."""
    began = time.monotonic()
    done = run_cli(
        "--url", vhost_url, "call", unique("nobody"), "ping", env=cli_env(), timeout_s=10
    )
    elapsed = time.monotonic() - began
    assert done.returncode != 0
    assert "NO_ROUTE" in done.stdout + done.stderr
    assert elapsed < 2, f"took {elapsed:.2f}s"


@pytest.mark.parametrize(
    ("payload", "message"),
    [("{not json", "not valid JSON"), ("[1, 2]", "must be a JSON object")],
)
def test_call_with_bad_payload_exits_2(vhost_url: str, payload: str, message: str) -> None:
    """A payload that is not a JSON object exits 2 with a clear message."""
    done = run_cli("--url", vhost_url, "call", "task_manager", "task_add", payload, env=cli_env())
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_python_dash_m_help() -> None:
    """`python -m amqp_agents --help` lists the commands and exits 0."""
    done = run_cli("--help", env=cli_env(), module=True)
    assert done.returncode == 0, done.stderr
    assert "run" in done.stdout
    assert "call" in done.stdout


@pytest.mark.parametrize("command", ["call", "run"])
def test_wrong_password_fails_clearly_without_echoing_it(
    vhost_url: str, command: str, tmp_path: Path
) -> None:
    """A rejected password exits 1 with a clear message, and the password is never printed."""
    password = f"S3cretPa55-{uuid.uuid4().hex[:8]}"
    url = with_credentials(vhost_url, "guest", password)
    if command == "call":
        args = ["call", "task_manager", "task_list"]
    else:
        args = ["run", "tests.agents_for_tests:recorder"]
    env = cli_env(AAT_AGENT_NAME="never", AAT_RECORD_PATH=str(tmp_path / "ids"))
    done = run_cli("--log-level", "DEBUG", "--url", url, *args, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "cannot connect" in done.stderr
    assert "authentication failed" in done.stderr
    assert "Traceback" not in output
    assert password not in output


def test_password_never_printed_with_valid_credentials(
    tasks_worker: CliProcess,
    vhost_url: str,
    module_vhost: str,
    secret_user: tuple[str, str],
    broker_admin: BrokerAdmin,
    unique: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """With a right password, `call` and `run` (DEBUG logs, then SIGTERM) never print it."""
    user, password = secret_user
    url = with_credentials(vhost_url, user, password)
    done = run_cli(
        "--log-level", "DEBUG", "--url", url, "call", "task_manager", "task_list", env=cli_env()
    )
    assert done.returncode == 0, done.stderr
    assert password not in done.stdout + done.stderr

    name = unique("secret")
    env = cli_env(AAT_AGENT_NAME=name, AAT_RECORD_PATH=str(tmp_path / "ids"))
    worker = CliProcess(
        ["--log-level", "DEBUG", "--url", url, "run", "tests.agents_for_tests:recorder"],
        env=env,
        log_dir=tmp_path,
    )
    try:
        wait_until_sync(
            lambda: (
                worker.running() and consumers(broker_admin, module_vhost, f"agents.{name}") == 1
            ),
            timeout_s=20,
            what="the worker to consume",
        )
        worker.terminate()
        code = worker.wait(15)
    finally:
        worker.close()
    output = worker.output()
    assert code == 0, output
    assert f"{user}:***@" in output, "the URL should be logged, redacted"
    assert password not in output


def test_malformed_url_is_a_configuration_error(vhost_url: str) -> None:
    """A URL with a non-numeric port exits 2 with a configuration error, not a traceback."""
    _, port = broker_address(vhost_url)
    url = with_credentials(vhost_url, "guest", "S3cretPa55").replace(f":{port}/", ":notaport/")
    assert ":notaport/" in url
    done = run_cli("--url", url, "call", "task_manager", "task_list", env=cli_env())
    assert "S3cretPa55" not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert done.returncode == 2
    assert "configuration error" in done.stderr


def test_unknown_vhost_fails_clearly(broker_url: str, unique: Callable[[str], str]) -> None:
    """A vhost the broker refuses exits 1 with AccessRefusedError (no retry fixes it)."""
    url = url_for_vhost(broker_url, unique("no-such-vhost"))
    done = run_cli("--url", url, "call", "task_manager", "task_list", env=cli_env())
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "AccessRefusedError" in done.stderr
    assert "vhost" in done.stderr


def test_amqp_url_env_is_used_without_url(tasks_worker: CliProcess, vhost_url: str) -> None:
    """AMQP_URL names the broker when --url is absent; --url wins when both are given."""
    title = f"from-env-{uuid.uuid4().hex[:8]}"
    payload = json.dumps({"title": title})
    done = run_cli("call", "task_manager", "task_add", payload, env=cli_env(AMQP_URL=vhost_url))
    assert done.returncode == 0, done.stderr

    listed = run_cli("--url", vhost_url, "call", "task_manager", "task_list", env=cli_env())
    assert listed.returncode == 0, listed.stderr
    assert title in [task["title"] for task in json.loads(listed.stdout)["data"]["tasks"]]

    wrong = with_credentials(vhost_url, "guest", "wrong-password")
    done = run_cli(
        "--url", vhost_url, "call", "task_manager", "task_list", env=cli_env(AMQP_URL=wrong)
    )
    assert done.returncode == 0, done.stderr


def test_run_imports_modules_from_the_working_directory(
    vhost_url: str,
    module_vhost: str,
    broker_admin: BrokerAdmin,
    unique: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """`amqp-agents run pkg.mod:attr` finds pkg in the cwd, like `python -m amqp_agents` does."""
    name = unique("cwd")
    env = cli_env(pythonpath=False, AAT_AGENT_NAME=name, AAT_RECORD_PATH=str(tmp_path / "ids"))
    worker = CliProcess(
        ["--url", vhost_url, "run", "tests.agents_for_tests:recorder"], env=env, log_dir=tmp_path
    )
    try:
        wait_until_sync(
            lambda: (
                worker.running() and consumers(broker_admin, module_vhost, f"agents.{name}") == 1
            ),
            timeout_s=20,
            what="the worker to consume",
        )
    finally:
        worker.close()
