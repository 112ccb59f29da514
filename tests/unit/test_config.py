"""Settings: URL redaction, validation, and reading the environment."""

import os
from pathlib import Path

import pytest
from pydantic import BaseModel, SecretStr, ValidationError

from amqp_agents.config import (
    DEFAULT_URL,
    ConnectionSettings,
    RetryPolicy,
    RpcSettings,
    Settings,
    WorkerSettings,
    load_settings,
    redact_url,
)
from amqp_agents.errors import ConfigurationError

PASSWORD = "s3cr3t-pa55"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run without any AMQP_* variable from the developer's or CI's environment."""
    for name in list(os.environ):
        if name.startswith("AMQP_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        (f"amqp://user:{PASSWORD}@host:5672/vhost", "amqp://user:***@host:5672/vhost"),
        (f"amqp://user:{PASSWORD}@host/", "amqp://user:***@host/"),
        (f"amqps://user:{PASSWORD}@host:5671/%2F", "amqps://user:***@host:5671/%2F"),
        (f"amqp://:{PASSWORD}@host/", "amqp://:***@host/"),
        ("amqp://user@host/", "amqp://user@host/"),
        ("amqp://host:5672/", "amqp://host:5672/"),
        ("amqps://host/?heartbeat=10", "amqps://host/?heartbeat=10"),
    ],
    ids=["port", "no-port", "amqps", "no-user", "no-password", "no-credentials", "query"],
)
def test_redact_url(url: str, redacted: str) -> None:
    """redact_url replaces only the password with *** and leaves other URLs alone."""
    assert redact_url(url) == redacted


def test_redact_url_keeps_ipv6_brackets() -> None:
    """An IPv6 host keeps its brackets, so the redacted URL is still a valid URL."""
    assert redact_url(f"amqp://u:{PASSWORD}@[::1]:5672/v") == "amqp://u:***@[::1]:5672/v"


@pytest.mark.parametrize("url", ["amqp://h/", "amqps://u:p@h:5671/v"])
def test_connection_settings_accept_amqp_urls(url: str) -> None:
    """amqp:// and amqps:// URLs are accepted."""
    assert ConnectionSettings(url=SecretStr(url)).url.get_secret_value() == url


@pytest.mark.parametrize("url", ["http://h/", "https://u:p@h/", "localhost:5672"])
def test_connection_settings_reject_other_schemes(url: str) -> None:
    """Any other scheme fails validation on the url field."""
    with pytest.raises(ValidationError, match="must start with amqp://") as caught:
        ConnectionSettings.model_validate({"url": url})
    assert caught.value.errors()[0]["loc"] == ("url",)


def test_rejected_url_error_hides_the_password() -> None:
    """The validation error for a bad URL does not contain its password."""
    with pytest.raises(ValidationError) as caught:
        ConnectionSettings.model_validate({"url": f"http://user:{PASSWORD}@host/"})
    assert PASSWORD not in str(caught.value)


def test_settings_reject_other_schemes() -> None:
    """A non-AMQP top-level URL fails validation."""
    with pytest.raises(ValidationError):
        Settings(url=SecretStr("http://host/"))


@pytest.mark.parametrize(
    ("model", "field", "value"),
    [
        (ConnectionSettings, "heartbeat_s", 0),
        (ConnectionSettings, "max_message_bytes", 10),
        (WorkerSettings, "concurrency", 0),
        (WorkerSettings, "action_timeout_s", 1800),
        (WorkerSettings, "grace_period_s", -1),
        (RpcSettings, "timeout_s", 0),
    ],
)
def test_invalid_values_name_the_field(model: type[BaseModel], field: str, value: object) -> None:
    """An out-of-range value raises ValidationError located at that field."""
    with pytest.raises(ValidationError) as caught:
        model.model_validate({field: value})
    assert [error["loc"] for error in caught.value.errors()] == [(field,)]


def test_settings_groups_forbid_unknown_fields() -> None:
    """A misspelt setting is an error, not silently ignored."""
    with pytest.raises(ValidationError, match="concurency"):
        WorkerSettings.model_validate({"concurency": 4})


def test_settings_defaults() -> None:
    """With no environment, settings are the documented defaults."""
    settings = Settings()

    assert settings.url.get_secret_value() == DEFAULT_URL
    assert settings.worker.concurrency == 16
    assert settings.topology.requests_exchange == "agents"


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """AMQP_URL and AMQP_AGENTS_<GROUP>__<NAME> variables fill the settings."""
    url = f"amqp://app:{PASSWORD}@broker:5672/prod"
    monkeypatch.setenv("AMQP_URL", url)
    monkeypatch.setenv("AMQP_AGENTS_WORKER__CONCURRENCY", "3")
    monkeypatch.setenv("AMQP_AGENTS_RPC__TIMEOUT_S", "1.5")

    settings = Settings()

    assert settings.url.get_secret_value() == url
    assert settings.connection.url.get_secret_value() == url
    assert settings.worker.concurrency == 3
    assert settings.rpc.timeout_s == 1.5


def test_settings_read_prefixed_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """AMQP_AGENTS_URL is accepted as well as AMQP_URL."""
    monkeypatch.setenv("AMQP_AGENTS_URL", "amqps://b/")

    assert Settings().url.get_secret_value() == "amqps://b/"


def test_unrelated_prefixed_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """Variables sharing the prefix but naming no setting (the test suite's) do not fail."""
    monkeypatch.setenv("AMQP_AGENTS_TEST_URL", "amqp://elsewhere/")

    assert Settings().url.get_secret_value() == DEFAULT_URL


def test_invalid_environment_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad value in the environment raises ValidationError located at its field."""
    monkeypatch.setenv("AMQP_AGENTS_WORKER__CONCURRENCY", "0")

    with pytest.raises(ValidationError) as caught:
        Settings()
    assert caught.value.errors()[0]["loc"] == ("worker", "concurrency")


def test_settings_never_show_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    """repr, str and JSON of every settings object hide the password."""
    monkeypatch.setenv("AMQP_URL", f"amqp://app:{PASSWORD}@broker/")
    settings = Settings()
    connection = settings.connection

    for shown in (
        repr(settings),
        str(settings),
        settings.model_dump_json(),
        repr(connection),
        str(connection),
        connection.model_dump_json(),
    ):
        assert PASSWORD not in shown
    assert connection.url.get_secret_value().endswith("@broker/")


def test_settings_file_is_overridden_by_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--config FILE < environment < command line; a bad value names the setting."""
    config = tmp_path / "settings.json"
    config.write_text('{"worker": {"concurrency": 3, "grace_period_s": 4}}')
    monkeypatch.delenv("AMQP_AGENTS_WORKER__CONCURRENCY", raising=False)
    assert load_settings(config).worker.concurrency == 3
    monkeypatch.setenv("AMQP_AGENTS_WORKER__CONCURRENCY", "7")
    settings = load_settings(config)
    assert (settings.worker.concurrency, settings.worker.grace_period_s) == (7, 4)
    assert load_settings(config, worker={"concurrency": 9}).worker.concurrency == 9
    bad = tmp_path / "bad.toml"
    bad.write_text("[worker]\nconcurrency = 0\n")
    monkeypatch.delenv("AMQP_AGENTS_WORKER__CONCURRENCY")
    with pytest.raises(ValidationError, match=r"worker\.concurrency"):
        load_settings(bad)
    with pytest.raises(ConfigurationError, match="no settings file"):
        load_settings(tmp_path / "missing.json")


def test_the_url_can_come_from_a_mounted_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AMQP_URL_FILE (a mounted secret) provides the URL when none is set otherwise."""
    secret = tmp_path / "url"
    secret.write_text("amqp://app:s3cret@rabbit:5672/prod\n")
    monkeypatch.delenv("AMQP_URL", raising=False)
    monkeypatch.delenv("AMQP_AGENTS_URL", raising=False)
    monkeypatch.setenv("AMQP_URL_FILE", str(secret))
    settings = load_settings()
    assert settings.url.get_secret_value() == "amqp://app:s3cret@rabbit:5672/prod"
    assert settings.connection.url.get_secret_value() == "amqp://app:s3cret@rabbit:5672/prod"


def test_all_tries_of_a_delivery_must_fit_the_brokers_ack_timeout() -> None:
    """Each try may fit while all of them (and the backoffs) do not: refused at once."""
    WorkerSettings(action_timeout_s=500, retry=RetryPolicy(attempts=3))  # 1504 s: fits
    with pytest.raises(ValidationError, match="delivery-ack timeout"):
        WorkerSettings(action_timeout_s=700, retry=RetryPolicy(attempts=3))


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ({}, DEFAULT_URL),
        ({"AMQP_URL": "amqp://u:p@a-host/vh"}, "amqp://u:p@a-host/vh"),
        ({"AMQP_AGENTS_URL": "amqp://u:p@b-host/vh"}, "amqp://u:p@b-host/vh"),
        (
            {"AMQP_URL": "amqp://u:p@a-host/first", "AMQP_AGENTS_URL": "amqp://u:p@b-host/x"},
            "amqp://u:p@a-host/first",
        ),
    ],
)
def test_connection_settings_read_the_url_as_settings_do(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], expected: str
) -> None:
    """ConnectionSettings() and Settings() reach the same broker and vhost from the same
    environment (a script and a worker agree); an explicit url still wins."""
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    assert ConnectionSettings().url.get_secret_value() == expected
    assert Settings().connection.url.get_secret_value() == expected
    explicit = ConnectionSettings(url=SecretStr("amqp://guest:guest@elsewhere/"))
    assert explicit.url.get_secret_value() == "amqp://guest:guest@elsewhere/"


def test_connection_settings_validate_the_url_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bad AMQP_URL fails ConnectionSettings() as it fails Settings()."""
    monkeypatch.setenv("AMQP_URL", "http://broker/")
    with pytest.raises(ValidationError, match="must start with amqp://"):
        ConnectionSettings()


def test_several_broker_urls_are_the_nodes_of_a_cluster() -> None:
    """A comma-separated url lists nodes in the order they are tried; each is checked,
    and redact_url hides every password."""
    settings = ConnectionSettings(url=SecretStr("amqp://u:p1@a:5681/v, amqp://u:p2@b:5682/v"))
    assert settings.urls == ["amqp://u:p1@a:5681/v", "amqp://u:p2@b:5682/v"]
    assert redact_url(settings.url.get_secret_value()) == (
        "amqp://u:***@a:5681/v,amqp://u:***@b:5682/v"
    )


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("amqp://a/,memory://", "memory:// is one in-process broker"),
        ("amqp://a/,amqps://b/", "all use amqp:// or all amqps://"),
        ("amqp://a/,amqp://:5672/", "has no host"),
        (" , ", "is empty"),
    ],
)
def test_a_bad_list_of_broker_urls_is_refused(url: str, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        ConnectionSettings(url=SecretStr(url))
