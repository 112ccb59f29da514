"""Settings, in groups, read from the environment (``AMQP_AGENTS_*``) or passed in.

Only the CLI reads the environment; library objects take these models as arguments so
tests and embedding applications never depend on process-global state. Secrets are
``SecretStr`` and :func:`redact_url` is the only way a URL reaches a log line.

It is about 480 lines because every setting is documented where it is declared (the
example files in ``config/`` are checked against these fields); the groups are plain
models with no behaviour to split out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, Self
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from amqp_agents.errors import AgentError, ConfigurationError, Retry, RetryableError
from amqp_agents.models.topology import Topology

__all__ = [
    "DEFAULT_URL",
    "MAX_TIMEOUT_S",
    "NO_RETRY",
    "URL_VARIABLES",
    "ConnectionSettings",
    "MetricsSettings",
    "RetryPolicy",
    "RpcSettings",
    "Settings",
    "TlsSettings",
    "TracingSettings",
    "WorkerSettings",
    "load_settings",
    "redact_url",
    "split_urls",
    "url_from_environment",
]

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
URL_VARIABLES = ("AMQP_URL", "AMQP_AGENTS_URL")
"""Environment variables holding the broker URL, the first set wins."""
# RabbitMQ's default delivery-ack timeout (consumer_timeout) is 30 minutes: a handler
# still running then gets its channel closed. Handler timeouts stay well below it.
BROKER_ACK_TIMEOUT_S = 1800.0
# The longest a call may wait for its reply: one day. A request's deadline becomes its
# AMQP ``expiration``, which the broker refuses beyond about 49 days (a 32-bit count of
# milliseconds) by closing the channel; a bound far below that keeps every timeout a
# caller can give a valid expiration, and no caller should wait longer for a reply.
MAX_TIMEOUT_S = 86_400.0


def split_urls(url: str) -> list[str]:
    """The broker URLs of a setting: one, or several separated by commas (the nodes of a
    cluster, tried in turn)."""
    return [part.strip() for part in url.split(",") if part.strip()]


def redact_url(url: str) -> str:
    """The URL (or comma-separated URLs) with passwords replaced by ``***``, safe for
    logs and output."""
    if "," in url:
        return ",".join(redact_url(part) for part in split_urls(url))
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]  # keeps IPv6 brackets and the port
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class TlsSettings(BaseModel):
    """TLS for ``amqps://`` URLs. Verification of the chain and the host name is on
    unless explicitly turned off (``verify=False``, for test brokers only)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ca_file: Path | None = None
    """PEM file of the CA(s) that signed the broker's certificate (else the system's)."""
    cert_file: Path | None = None
    """Client certificate (PEM) for brokers that require one (mutual TLS)."""
    key_file: Path | None = None
    """The client certificate's private key (PEM); may be inside ``cert_file``."""
    verify: bool = True
    """Verify the broker's certificate chain and host name (the URL's host)."""

    @field_validator("ca_file", "cert_file", "key_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # An empty environment variable (KEY=) means "not set", not the path "".
        return None if value == "" else value

    @model_validator(mode="after")
    def _files_exist(self) -> Self:
        for name in ("ca_file", "cert_file", "key_file"):
            path: Path | None = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"tls.{name}: no file at {path}")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("tls.key_file is set without tls.cert_file")
        return self


def url_from_environment() -> SecretStr:
    """The broker URL as :class:`Settings` reads it: ``AMQP_URL``, else
    ``AMQP_AGENTS_URL``, else :data:`DEFAULT_URL`."""
    for name in URL_VARIABLES:
        if name in os.environ:
            return SecretStr(os.environ[name])
    return SecretStr(DEFAULT_URL)


class ConnectionSettings(BaseModel):
    """How to reach the broker.

    Without ``url``, the URL is the one :class:`Settings` would read (``AMQP_URL``, else
    ``AMQP_AGENTS_URL``, else the local default), so a script and a worker given the
    same environment reach the same broker and vhost. Several comma-separated URLs name
    the nodes of a cluster: a connect goes to the first reachable one, a reconnect to
    the next one after the node it lost (see :mod:`amqp_agents.transport.rabbit.link`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    url: SecretStr = Field(default_factory=url_from_environment, validate_default=True)
    heartbeat_s: int = Field(default=10, ge=1, le=600)
    """Seconds between heartbeats; a link silent for about 3x this is declared dead."""
    connect_timeout_s: float = Field(default=10.0, gt=0)
    publish_timeout_s: float = Field(default=10.0, gt=0)
    max_message_bytes: int = Field(default=1024 * 1024, ge=1024, le=128 * 1024 * 1024)
    client_name: str = "amqp-agents"
    reconnect: bool = True
    """Reconnect by itself after a lost connection (clients and event buses; a worker's
    supervisor reconnects on its own terms)."""
    reconnect_initial_s: float = Field(default=0.25, gt=0)
    """First reconnect delay; doubles per failed attempt, with full jitter."""
    reconnect_max_s: float = Field(default=15.0, gt=0)
    """Ceiling of the reconnect delay."""
    tls: TlsSettings = TlsSettings()
    """Used for ``amqps://`` URLs."""

    @property
    def urls(self) -> list[str]:
        """The broker URLs: one, or the nodes of a cluster in the order they are tried."""
        return split_urls(self.url.get_secret_value())

    @field_validator("url")
    @classmethod
    def _amqp_url(cls, value: SecretStr) -> SecretStr:
        urls = split_urls(value.get_secret_value())
        if not urls:
            raise ValueError("the broker URL is empty")
        schemes = {urlsplit(url).scheme for url in urls}
        if "memory" in schemes:
            if len(urls) > 1:
                raise ValueError("memory:// is one in-process broker: it takes no other URL")
            return value  # the in-process broker: no host, no port
        if len(schemes) > 1:
            raise ValueError("the broker URLs must all use amqp:// or all amqps://")
        for url in urls:
            _check_amqp_url(url)
        return value


def _check_amqp_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps"):
        raise ValueError(
            f"the broker URL must start with amqp://, amqps:// or memory://, not {parts.scheme}://"
        )
    try:
        port = parts.port
    except ValueError:
        raise ValueError("the broker URL has an invalid port") from None
    if not parts.hostname:
        raise ValueError("the broker URL has no host")
    if port == 0:
        raise ValueError("the broker URL has an invalid port")


class RetryPolicy(BaseModel):
    """How failing requests are retried (per worker, overridable per action).

    A failing request climbs three rungs, each bounded:

    1. **in process**: up to ``attempts`` tries within one delivery, with exponential
       backoff and jitter (tenacity), never past the caller's deadline;
    2. **redelivery**: the worker republishes the request to a delay tier
       (``agents.<agent>.retry.<ms>``, a queue whose TTL dead-letters back to the work
       queue; one queue per delay since per-message TTLs only expire at the head), with
       ``x-attempt`` + 1 and its priority kept, until ``max_deliveries``;
    3. **dead-letter**: ``agents.<agent>.dead`` with headers saying why; the caller gets
       the error.

    Only failures marked retryable climb: :class:`~amqp_agents.errors.RetryableError` (and
    :class:`~amqp_agents.errors.Retry`, which skips rung 1), unexpected exceptions if
    ``retry_unexpected`` is on, and handler timeouts if ``retry_timeouts`` is on. Other
    agent errors (``NOT_FOUND``, ``INVALID_PAYLOAD``, ``UNKNOWN_ACTION``...) are answers and
    are never retried. A request that ends in ``INTERNAL_ERROR`` is dead-lettered too,
    so a bug's victims can be replayed once it is fixed.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    attempts: int = Field(default=3, ge=1, le=100)
    """Tries within one delivery (1: no in-process retry)."""
    backoff_initial_s: float = Field(default=0.05, ge=0)
    """First in-process backoff; doubles each try, with jitter, up to ``backoff_max_s``."""
    backoff_max_s: float = Field(default=2.0, ge=0)
    redelivery_delays_s: tuple[float, ...] = (1.0, 5.0, 30.0)
    """Delay tiers for redeliveries: the n-th redelivery waits the n-th (the last repeats)."""
    max_deliveries: int = Field(default=4, ge=1, le=1000)
    """Deliveries before the request is dead-lettered (1: never redeliver)."""
    retry_unexpected: bool = False
    """Also retry exceptions that are not AgentErrors (bugs or infrastructure). Off by
    default: only errors marked retryable are; an unexpected one is answered
    ``INTERNAL_ERROR`` at once and dead-lettered."""
    retry_timeouts: bool = False
    """Retry handlers that ran out of time."""

    @field_validator("redelivery_delays_s")
    @classmethod
    def _sane_delays(cls, delays: tuple[float, ...]) -> tuple[float, ...]:
        if not delays:
            raise ValueError("give at least one redelivery delay")
        if any(not 0.001 <= delay <= 86_400 for delay in delays):
            raise ValueError("redelivery delays must be between 1 ms and one day")
        return tuple(sorted(set(delays)))

    def tiers_ms(self) -> list[int]:
        """The delay tiers, in milliseconds (one retry queue each)."""
        return [round(delay * 1000) for delay in self.redelivery_delays_s]

    def redelivery_delay_ms(self, attempt: int, requested_s: float | None) -> int:
        """The tier for the redelivery after ``attempt``: the smallest tier that honours a
        requested delay, else the ``attempt``-th tier."""
        tiers = self.tiers_ms()
        if requested_s is not None:
            wanted = round(requested_s * 1000)
            return next((tier for tier in tiers if tier >= wanted), tiers[-1])
        return tiers[min(attempt, len(tiers)) - 1]

    def is_retryable(self, error: BaseException, *, timed_out: bool = False) -> bool:
        """Whether this failure may succeed if tried again."""
        if timed_out:
            return self.retry_timeouts
        if isinstance(error, RetryableError):
            return True
        if isinstance(error, AgentError):
            return False
        return self.retry_unexpected and isinstance(error, Exception)

    def retries_in_process(self, error: BaseException) -> bool:
        """Retried right here (``Retry`` asks for a delayed redelivery instead)."""
        return not isinstance(error, Retry)


NO_RETRY = RetryPolicy(attempts=1, max_deliveries=1)
"""Never retry: fail at the first error."""


class WorkerSettings(BaseModel):
    """How a worker consumes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    concurrency: int = Field(default=16, ge=1, le=10_000)
    """Handlers running at once across the worker; also each queue's prefetch."""
    processes: int = Field(default=1, ge=1, le=64)
    """Worker processes of ``amqp-agents run`` (``--processes``): more than 1 starts a
    parent that supervises that many, one core each (see :mod:`amqp_agents.cli.parent`)."""
    grace_period_s: float = Field(default=25.0, ge=0)
    """On stop, how long in-flight handlers may finish before they are cancelled."""
    action_timeout_s: float = Field(default=60.0, gt=0, lt=BROKER_ACK_TIMEOUT_S)
    """Default per-action timeout; kept below the broker's delivery-ack timeout."""
    retry: RetryPolicy = RetryPolicy()
    """Default retry policy of actions (``@action(retry=...)`` overrides it)."""

    reattach_limit_s: float = Field(default=30.0, gt=0, le=3600)
    """How long a consumer that ended (queue deleted, channel closed, link lost) may
    take to re-attach; past it liveness fails and the worker starts over on a new
    connection."""

    @model_validator(mode="after")
    def _fits_the_ack_timeout(self) -> Self:
        # All tries of one delivery, and the backoffs between them, run before its ack:
        # past the broker's delivery-ack timeout the channel is closed under every
        # delivery on it, and the request is redelivered as if it had crashed a worker.
        retry = self.retry
        worst_s = self.action_timeout_s * retry.attempts + retry.backoff_max_s * (
            retry.attempts - 1
        )
        if worst_s >= BROKER_ACK_TIMEOUT_S:
            raise ValueError(
                f"action_timeout_s x retry.attempts plus the backoffs ({worst_s:g}s) must stay"
                f" below the broker's delivery-ack timeout ({BROKER_ACK_TIMEOUT_S:g}s)"
            )
        return self


class MetricsSettings(BaseModel):
    """Metrics and probes (served by ``amqp-agents run`` when a port is set)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    port: int | None = Field(default=None, ge=0, le=65_535)
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on this port (``--metrics-port``);
    unset: not served."""
    host: str = "0.0.0.0"  # noqa: S104  # probes must be reachable from the kubelet
    """The address to serve them on (``--metrics-host``); ``127.0.0.1`` keeps them local."""

    depth_interval_s: float = Field(default=5.0, gt=0)
    """How often queue depth and consumers are probed."""
    loop_lag_limit_s: float = Field(default=5.0, gt=0)
    """/healthz fails while the event loop lags behind by more than this."""

    @field_validator("port", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # An empty environment variable (KEY=) means "not served", as in the env example.
        return None if value == "" else value


class TracingSettings(BaseModel):
    """OpenTelemetry tracing (the ``otel`` extra); see :mod:`amqp_agents.tracing`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = False
    """Make spans (``AMQP_AGENTS_TRACING__ENABLED=true``). They go to the OpenTelemetry
    API's global tracer provider: configure an SDK, e.g. with ``opentelemetry-instrument``."""


class RpcSettings(BaseModel):
    """How the RPC client calls."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_timeout_s: ClassVar[float] = MAX_TIMEOUT_S
    """The longest timeout a call accepts (one day): it must fit an AMQP expiration."""

    timeout_s: float = Field(default=30.0, gt=0, le=MAX_TIMEOUT_S)
    """Default time a call waits for its reply (at most ``max_timeout_s``)."""

    persistent: bool = True
    """Publish requests persistent (delivery mode 2): a request waiting in its queue
    survives a broker restart. ``False`` (delivery mode 1) spares the broker a disk
    write per request, and a request still queued when the broker restarts is lost
    (its caller times out, or its ``idempotent`` call is sent again).
    Replies are always transient. See ``docs/protocol.md`` section 3.1."""


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
    connection: ConnectionSettings = Field(default_factory=ConnectionSettings.model_construct)
    """Validated in :meth:`_one_url`, with the URL read above (a default built at import
    time would read ``AMQP_URL`` then, and a bad one would crash the import)."""
    worker: WorkerSettings = WorkerSettings()
    rpc: RpcSettings = RpcSettings()
    metrics: MetricsSettings = MetricsSettings()
    tracing: TracingSettings = TracingSettings()
    topology: Topology = Topology()
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    """The CLI's event loop: ``auto`` takes uvloop when it is installed (the ``speed``
    extra, and the container image), ``asyncio`` never does, ``uvloop`` insists."""

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


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from (lowest to highest precedence) defaults, ``config_file`` (JSON or
    TOML), environment variables, then ``overrides`` (command-line options).

    ``AMQP_URL_FILE`` names a file holding the broker URL (a mounted secret); it is read
    when no URL is given otherwise.

    Raises:
        ConfigurationError: the file is missing or not JSON/TOML.
        pydantic.ValidationError: a setting is invalid (the message names it).
    """
    if "url" not in overrides and not _url_in_environment():
        secret_file = os.environ.get("AMQP_URL_FILE")
        if secret_file:
            try:
                overrides["url"] = SecretStr(Path(secret_file).read_text().strip())
            except OSError as exc:
                raise ConfigurationError(f"cannot read AMQP_URL_FILE: {exc.strerror}") from None
    if config_file is None:
        return Settings(**overrides)
    if not config_file.is_file():
        raise ConfigurationError(f"no settings file at {config_file}")
    suffix = config_file.suffix.lower()
    if suffix not in (".json", ".toml"):
        raise ConfigurationError(f"settings files are .json or .toml, not {suffix or 'no suffix'}")
    if suffix == ".json":
        # The JSON source merges the top level into a dict: anything but an object
        # ([1, 2], "x") would end in a TypeError traceback. (Empty means {}.)
        try:
            text = config_file.read_text(encoding="utf-8")
            top = json.loads(text) if text.strip() else {}
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"cannot read {config_file}: {exc}") from None
        if not isinstance(top, dict):
            raise ConfigurationError(
                f"cannot read {config_file}: the top level must be an object of setting"
                f" groups, not {type(top).__name__}"
            )

    class FileSettings(Settings):
        # Validation errors say "for Settings", as they do without a file.
        model_config = SettingsConfigDict(title="Settings")

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            file_source = (
                JsonConfigSettingsSource(settings_cls, json_file=config_file)
                if suffix == ".json"
                else TomlConfigSettingsSource(settings_cls, toml_file=config_file)
            )
            return (init_settings, env_settings, file_source)

    try:
        return FileSettings(**overrides)
    except (ValueError, OSError) as exc:
        if isinstance(exc, ValidationError):
            raise
        raise ConfigurationError(f"cannot read {config_file}: {exc}") from None


def _url_in_environment() -> bool:
    return any(os.environ.get(name) for name in URL_VARIABLES)
