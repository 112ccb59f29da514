"""Settings, in groups, read from the environment (``AMQP_AGENTS_*``) or passed in.

Only the CLI reads the environment; library objects take these models as arguments so
tests and embedding applications never depend on process-global state. Secrets are
``SecretStr`` and :func:`redact_url` is the only way a URL reaches a log line.
"""

from __future__ import annotations

from typing import Self
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from amqp_agents.models.wire import Topology

__all__ = [
    "DEFAULT_URL",
    "ConnectionSettings",
    "RpcSettings",
    "Settings",
    "WorkerSettings",
    "redact_url",
]

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
# RabbitMQ's default delivery-ack timeout (consumer_timeout) is 30 minutes: a handler
# still running then gets its channel closed. Handler timeouts stay well below it.
BROKER_ACK_TIMEOUT_S = 1800.0


def redact_url(url: str) -> str:
    """The URL with its password replaced by ``***``, safe for logs and output."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]  # keeps IPv6 brackets and the port
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class ConnectionSettings(BaseModel):
    """How to reach the broker."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    url: SecretStr = SecretStr(DEFAULT_URL)
    heartbeat_s: int = Field(default=10, ge=1, le=600)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    publish_timeout_s: float = Field(default=10.0, gt=0)
    max_message_bytes: int = Field(default=1024 * 1024, ge=1024, le=128 * 1024 * 1024)
    client_name: str = "amqp-agents"

    @field_validator("url")
    @classmethod
    def _amqp_url(cls, value: SecretStr) -> SecretStr:
        parts = urlsplit(value.get_secret_value())
        if parts.scheme == "memory":
            return value  # the in-process broker: no host, no port
        if parts.scheme not in ("amqp", "amqps"):
            raise ValueError(
                "the broker URL must start with amqp://, amqps:// or memory://,"
                f" not {parts.scheme}://"
            )
        try:
            port = parts.port
        except ValueError:
            raise ValueError("the broker URL has an invalid port") from None
        if not parts.hostname:
            raise ValueError("the broker URL has no host")
        if port == 0:
            raise ValueError("the broker URL has an invalid port")
        return value


class WorkerSettings(BaseModel):
    """How a worker consumes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    concurrency: int = Field(default=16, ge=1, le=10_000)
    """Handlers running at once across the worker; also each queue's prefetch."""
    grace_period_s: float = Field(default=25.0, ge=0)
    """On stop, how long in-flight handlers may finish before they are cancelled."""
    action_timeout_s: float = Field(default=60.0, gt=0, lt=BROKER_ACK_TIMEOUT_S)
    """Default per-action timeout; kept below the broker's delivery-ack timeout."""


class RpcSettings(BaseModel):
    """How the RPC client calls."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    timeout_s: float = Field(default=30.0, gt=0)
    """Default time a call waits for its reply."""


class Settings(BaseSettings):
    """Every setting, from ``AMQP_AGENTS_<GROUP>__<NAME>`` environment variables.

    The broker URL also comes from ``AMQP_URL``, the conventional name.
    """

    model_config = SettingsConfigDict(
        env_prefix="AMQP_AGENTS_",
        env_nested_delimiter="__",
        extra="forbid",
        hide_input_in_errors=True,
    )

    url: SecretStr = Field(
        default=SecretStr(DEFAULT_URL),
        validation_alias=AliasChoices("AMQP_URL", "AMQP_AGENTS_URL", "url"),
    )
    connection: ConnectionSettings = ConnectionSettings()
    worker: WorkerSettings = WorkerSettings()
    rpc: RpcSettings = RpcSettings()
    topology: Topology = Topology()

    @model_validator(mode="after")
    def _one_url(self) -> Self:
        # The URL lives at the top level (AMQP_URL); the connection group carries a copy,
        # validated like the rest of the group, so the two can never disagree.
        if "url" in self.connection.model_fields_set and (
            self.connection.url.get_secret_value() != self.url.get_secret_value()
        ):
            raise ValueError(
                "set the broker URL with AMQP_URL (or AMQP_AGENTS_URL), not connection.url"
            )
        self.connection = ConnectionSettings.model_validate(
            {**self.connection.model_dump(), "url": self.url}
        )
        return self
