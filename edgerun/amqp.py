"""pika connection parameters from a broker URL: for the bridge and the scheduler only.

The agent never imports this module (it would pull in pika).
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import unquote

import pika

from .errors import ConfigError
from .settings import BrokerURL, TLSFiles


def vhost(url: BrokerURL) -> str:
    """`amqp://host/` and `amqp://host` mean the default vhost `/`; `amqp://host/%2f` too."""
    return unquote(url.path[1:]) if len(url.path) > 1 else "/"


def connection_parameters(url: BrokerURL, tls: TLSFiles | None = None, *, name: str,
                          heartbeat: int = 30, **extra: Any) -> pika.ConnectionParameters:
    """Parameters for `url`; amqps:// verifies the server and may present a client certificate."""
    ssl_options = None
    if url.tls:
        tls = tls or TLSFiles()
        try:
            context = ssl.create_default_context(cafile=tls.ca_file)
            if tls.cert_file:
                context.load_cert_chain(tls.cert_file, tls.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS files for {url}: {exc}") from None
        ssl_options = pika.SSLOptions(context, url.host)
    return pika.ConnectionParameters(
        host=url.host, port=url.port, virtual_host=vhost(url),
        credentials=pika.PlainCredentials(url.username or "guest", url.password or "guest"),
        heartbeat=heartbeat, ssl_options=ssl_options, connection_attempts=1,
        client_properties={"connection_name": name}, **extra)
