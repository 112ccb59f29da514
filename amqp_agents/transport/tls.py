"""The TLS context for ``amqps://`` connections, built from :class:`TlsSettings`.

Verification of the certificate chain and the host name is the default; turning it
off is an explicit ``verify=False`` and is logged, never silent.
"""

from __future__ import annotations

import logging
import ssl
from typing import TYPE_CHECKING

from amqp_agents.errors import ConfigurationError

if TYPE_CHECKING:
    from amqp_agents.config import TlsSettings

__all__ = ["client_context"]

log = logging.getLogger(__name__)


def client_context(tls: TlsSettings) -> ssl.SSLContext:
    """A client-side context: the CA file (or the system's CAs), an optional client
    certificate, TLS 1.2 at least.

    Raises:
        ConfigurationError: a file is not a readable PEM certificate or key.
    """
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=None if tls.ca_file is None else str(tls.ca_file)
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"tls.ca_file {tls.ca_file}: not a PEM CA bundle ({exc})"
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert_file is not None:
        try:
            context.load_cert_chain(
                str(tls.cert_file), None if tls.key_file is None else str(tls.key_file)
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(
                f"tls.cert_file {tls.cert_file}: cannot load the client certificate and key ({exc})"
            ) from None
    if not tls.verify:
        log.warning("TLS verification is OFF: the broker's identity is not checked")
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
