"""amqps:// through a local TLS-terminating proxy, with a CA made in the test.

The proxy (:class:`~tests.faults.FaultProxy` with ``server_ssl``) presents a server
certificate signed by a throw-away CA and forwards plaintext to the broker, so the
library's TLS settings are exercised end to end: the CA file, host-name checking,
client certificates (mutual TLS) and the explicit ``verify=False`` opt-out. Each
failure must be a clear ``BrokerUnavailableError`` naming TLS, within the connect
timeout, without the password.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from amqp_agents.config import ConnectionSettings
from amqp_agents.errors import BrokerUnavailableError, ConfigurationError
from amqp_agents.events.bus import EventBus
from amqp_agents.rpc.client import RpcClient
from amqp_agents.runtime.agent import Agent, action
from amqp_agents.runtime.worker import Worker
from amqp_agents.transport.rabbitmq import RabbitTransport
from tests.faults import FaultProxy, TlsMaterial, make_tls_material
from tests.support import wait_until

PASSWORD = "guest"


class Echo(Agent):
    @action("echo")
    async def echo(self, payload: dict[str, Any]) -> dict[str, Any]:
        return payload


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return make_tls_material(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_proxy(pki: TlsMaterial) -> Iterator[FaultProxy]:
    with FaultProxy(server_ssl=pki.server_context()) as proxy:
        yield proxy


@pytest.fixture
def mtls_proxy(pki: TlsMaterial) -> Iterator[FaultProxy]:
    with FaultProxy(server_ssl=pki.server_context(require_client_cert=True)) as proxy:
        yield proxy


def tls_settings(url: str, **tls: Any) -> ConnectionSettings:
    return ConnectionSettings.model_validate(
        {"url": url, "connect_timeout_s": 3, "reconnect": False, "tls": tls}
    )


async def test_an_rpc_call_over_tls_with_the_ca_file(
    tls_proxy: FaultProxy, pki: TlsMaterial, module_vhost: str, unique: Any
) -> None:
    url = tls_proxy.url(module_vhost, scheme="amqps", host="localhost")
    worker_transport = RabbitTransport(tls_settings(url, ca_file=pki.ca_file))
    client_transport = RabbitTransport(tls_settings(url, ca_file=pki.ca_file))
    agent = Echo(name=unique("tls-echo"))
    async with worker_transport, client_transport:
        worker = Worker(worker_transport, [agent])
        await worker.start()
        try:
            async with RpcClient(client_transport) as client:
                assert await client.call(agent.name, "echo", {"over": "tls"}, timeout_s=5) == {
                    "over": "tls"
                }
        finally:
            await worker.stop()
    assert tls_proxy.accepted_total == 4  # both sides: publish + consume connections
    assert tls_proxy.handshake_failures == 0


@pytest.mark.parametrize("trust", ["system CAs", "wrong CA"])
async def test_an_untrusted_certificate_is_refused_clearly(
    tls_proxy: FaultProxy, pki: TlsMaterial, module_vhost: str, trust: str
) -> None:
    url = tls_proxy.url(module_vhost, scheme="amqps", host="localhost", password=PASSWORD)
    options = {} if trust == "system CAs" else {"ca_file": pki.wrong_ca_file}
    transport = RabbitTransport(tls_settings(url, **options))
    began = time.monotonic()
    with pytest.raises(BrokerUnavailableError, match="TLS handshake failed") as caught:
        await transport.connect()
    assert time.monotonic() - began < 3.5
    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
    assert f":{PASSWORD}@" not in str(caught.value)


async def test_a_certificate_for_another_host_is_refused(
    pki: TlsMaterial, module_vhost: str, tmp_path: Path
) -> None:
    """Chain fine, name wrong: refused (host-name checking is on by default)."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("elsewhere.test").configure_cert(context)
    with FaultProxy(server_ssl=context) as proxy:
        url = proxy.url(module_vhost, scheme="amqps", host="localhost")
        transport = RabbitTransport(tls_settings(url, ca_file=tmp_path / "ca.pem"))
        with pytest.raises(BrokerUnavailableError, match="TLS handshake failed"):
            await transport.connect()


async def test_verify_off_is_an_explicit_and_logged_opt_out(
    tls_proxy: FaultProxy, pki: TlsMaterial, module_vhost: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = tls_proxy.url(module_vhost, scheme="amqps", host="localhost")
    with caplog.at_level(logging.WARNING, logger="amqp_agents.transport.tls"):
        transport = RabbitTransport(tls_settings(url, ca_file=pki.wrong_ca_file, verify=False))
    assert "TLS verification is OFF" in caplog.text
    async with transport:
        bus = EventBus(transport)
        await bus.start()
        assert await bus.publish("tls.unverified", {})
        await bus.aclose()


async def test_mutual_tls_with_a_client_certificate(
    mtls_proxy: FaultProxy, pki: TlsMaterial, module_vhost: str
) -> None:
    url = mtls_proxy.url(module_vhost, scheme="amqps", host="localhost")
    good = RabbitTransport(
        tls_settings(url, ca_file=pki.ca_file, cert_file=pki.client_cert, key_file=pki.client_key)
    )
    async with good:
        bus = EventBus(good)
        await bus.start()
        assert await bus.publish("tls.mutual", {})
        await bus.aclose()

    for options in (
        {"ca_file": pki.ca_file},  # no client certificate
        {
            "ca_file": pki.ca_file,
            "cert_file": pki.wrong_client_cert,
            "key_file": pki.wrong_client_key,
        },
    ):
        refused = RabbitTransport(tls_settings(url, **options))
        with pytest.raises(BrokerUnavailableError):
            await refused.connect()

    async def both_counted() -> bool:
        # The proxy counts a failed handshake in its own thread, possibly just after
        # the client has given up: the count may lag the refusal by a moment.
        return mtls_proxy.handshake_failures >= 2

    await wait_until(both_counted, timeout_s=5, what="two failed handshakes counted")


def test_tls_settings_check_their_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"tls.ca_file: no file"):
        tls_settings("amqps://localhost/", ca_file=tmp_path / "missing.pem")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    with pytest.raises(ValueError, match="key_file is set without"):
        tls_settings("amqps://localhost/", key_file=not_pem)
    with pytest.raises(ConfigurationError, match="not a PEM CA bundle"):
        RabbitTransport(tls_settings("amqps://localhost/", ca_file=not_pem))
