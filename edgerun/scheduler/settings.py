"""`edgerun serve`'s settings: defaults < TOML `[serve]` table < EDGERUN_* < flags.

To add a setting: one `Option` in SERVE_OPTIONS and one field of the same name (and the
same default) in ServeSettings; tests/test_serve_settings.py checks that they agree. A
value with a check of its own gets a `check` function returning the problem or None.
Files the service reads (TLS, signing key) are checked when the settings are loaded,
so that a missing file is one line and exit 2 at start, not an error on first connect.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from edgerun.errors import ConfigError
from edgerun.protocol import (
    AUDIT_EXCHANGE,
    DEFAULT_PREFIX,
    EVENTS_EXCHANGE,
    SCHEDULER_QUEUE,
    TASKS_EXCHANGE,
    is_prefix,
)
from edgerun.settings import Option, config_path, config_table, parse_broker_urls, resolve

BROKER_SCHEMES = ("mqtt", "mqtts", "amqp", "amqps")
# top-level tables of the shared config file; anything else there is a mistake


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _not_negative(value: float) -> str | None:
    return None if value >= 0 else "must be 0 or more"


def _prefix(value: str) -> str | None:
    return None if is_prefix(value) else "must be one topic level without / + #"


def _hostport(value: str) -> str | None:
    try:
        split_hostport(value)
    except ConfigError as exc:
        return str(exc)
    return None


def _broker(value: str) -> str | None:
    try:
        parse_broker_urls(value, BROKER_SCHEMES)
    except ConfigError as exc:
        return str(exc)
    return None


def _queue_type(value: str) -> str | None:
    return None if value in ("classic", "quorum") else "must be classic or quorum"


def _name(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _level(value: str) -> str | None:
    return None if value.upper() in ("DEBUG", "INFO", "WARNING", "ERROR") else \
        "must be debug, info, warning or error"


def split_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{value!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


SERVE_OPTIONS = [
    Option("broker", str, None, "broker URL: mqtt://, mqtts:// (direct) or amqp://, amqps:// "
           "(through the bridge), several nodes of one cluster comma-separated; default: "
           "the embedded broker when one is started",
           _broker, metavar="URL"),
    Option("embedded_broker", str, None, "start the embedded MQTT broker (amqtt) on HOST:PORT",
           _hostport, metavar="HOST:PORT"),
    Option("db", str, "edgerun-scheduler.db", "the task store: a SQLite file, or a "
           "postgresql:// URL (several instances may share one)", _name, metavar="FILE|URL"),
    Option("keep_days", float, 0.0, "prune finished tasks and their updates older than this "
           "many days (0: keep everything)", _not_negative, metavar="DAYS"),
    Option("share_group", str, None, "MQTT: take updates and tasks through $share/NAME/ "
           "subscriptions, so that several instances on one store split them",
           metavar="NAME"),
    Option("listen", str, "127.0.0.1:8470", "HOST:PORT of the HTTP API", _hostport,
           metavar="HOST:PORT"),
    Option("prefix", str, DEFAULT_PREFIX, "first MQTT topic level", _prefix),
    Option("grace", float, 30.0, "seconds past a task's timeout before it is declared lost",
           _not_negative, metavar="S"),
    Option("tick", float, 1.0, "seconds between deadline checks", _positive, metavar="S"),
    Option("pace", int, 8, "at most this many tasks outstanding per node; the rest wait "
           "queued here (keep it below the agents' --queue-size)", _positive, metavar="N"),
    Option("offline_grace", float, 120.0, "seconds a node may stay offline (its Last Will) "
           "before its accepted and running tasks end lost", _not_negative, metavar="S"),
    Option("default_expiry", float, 86_400.0, "a task not taken within this many seconds "
           "expires (0: never)", _not_negative, metavar="S"),
    Option("events_topic", str, None, "MQTT topic prefix of the full-data events "
           "(default {prefix}/events; empty: none)", metavar="TOPIC"),
    Option("audit_exchange", str, AUDIT_EXCHANGE, "AMQP exchange of the full-data events "
           "(empty: none)", metavar="NAME"),
    Option("tasks_exchange", str, TASKS_EXCHANGE, "AMQP exchange tasks are published to",
           _name, metavar="NAME"),
    Option("events_exchange", str, EVENTS_EXCHANGE, "AMQP exchange the bridge publishes "
           "updates, output and status to", _name, metavar="NAME"),
    Option("queue", str, SCHEDULER_QUEUE, "durable AMQP queue of this scheduler", _name,
           metavar="NAME"),
    Option("queue_type", str, "classic", "x-queue-type of that queue: classic, or quorum "
           "(replicated) on a RabbitMQ cluster, as the bridge's `queue_type`", _queue_type),
    Option("client_id", str, "edgerun-scheduler", "MQTT client id (persistent session)",
           _name, metavar="ID"),
    Option("record_external", bool, True, "record tasks other clients publish"),
    Option("ca_file", str, None, "CA certificates for mqtts:// and amqps:// "
           "(default: the system's)", metavar="FILE"),
    Option("cert_file", str, None, "client certificate for mqtts:// and amqps://",
           metavar="FILE"),
    Option("key_file", str, None, "key of the client certificate", metavar="FILE"),
    Option("private_key", str, None, "Ed25519 private key (PEM, from `edgerun keygen`) to "
           "sign every task and cancel with", metavar="FILE"),
    Option("connect_timeout", float, 15.0, "seconds to wait for the broker at start-up",
           _positive, metavar="S"),
    Option("log_level", str, "info", "debug, info, warning or error", _level),
    Option("tls_cert", str, None, "serve the API and console over HTTPS with this "
           "certificate (PEM)", metavar="FILE"),
    Option("tls_key", str, None, "the key of --tls-cert (PEM)", metavar="FILE"),
    Option("insecure_http", bool, False, "allow plain HTTP on a non-loopback --listen "
           "address (behind a TLS proxy)"),
    Option("allowed_origins", str, None, "browser origins besides the API's own that may "
           "open its WebSocket, comma-separated (https://console.example:8443; *: any)",
           metavar="ORIGINS"),
    Option("admin_token_file", str, None, "where the first start writes the admin token "
           "(mode 0600; default: beside --db, FILE.admin-token); each start copies it to "
           "$XDG_STATE_HOME/edgerun/admin-token-PORT, where the local CLI looks",
           metavar="FILE"),
]

# settings naming a file the service must be able to read at start
FILE_SETTINGS = ("ca_file", "cert_file", "key_file", "private_key", "tls_cert", "tls_key")


@dataclass(frozen=True)
class ServeSettings:
    """Everything `edgerun serve` (and the in-process App of the demo and tests) runs with."""

    broker: str | None = None
    embedded_broker: str | None = None
    db: str = "edgerun-scheduler.db"
    keep_days: float = 0.0
    share_group: str | None = None
    listen: str = "127.0.0.1:8470"
    prefix: str = DEFAULT_PREFIX
    grace: float = 30.0
    tick: float = 1.0
    pace: int = 8
    offline_grace: float = 120.0
    default_expiry: float = 86_400.0
    events_topic: str | None = None
    audit_exchange: str = AUDIT_EXCHANGE
    tasks_exchange: str = TASKS_EXCHANGE
    events_exchange: str = EVENTS_EXCHANGE
    queue: str = SCHEDULER_QUEUE
    queue_type: str = "classic"
    client_id: str = "edgerun-scheduler"
    record_external: bool = True
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    private_key: str | None = None
    connect_timeout: float = 15.0
    log_level: str = "info"
    tls_cert: str | None = None
    tls_key: str | None = None
    insecure_http: bool = False
    allowed_origins: str | None = None
    admin_token_file: str | None = None

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> ServeSettings:
        """From resolved option values (every name a field); unknown names are a bug."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def check_files(settings: ServeSettings) -> None:
    """ConfigError naming the first file setting whose file cannot be read."""
    for name in FILE_SETTINGS:
        path = getattr(settings, name)
        if path is None:
            continue
        if not os.path.isfile(path):
            raise ConfigError(f"`{name}` {path}: no such file")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"`{name}` {path}: not readable")
    if settings.key_file and not settings.cert_file:
        raise ConfigError("`key_file` given without `cert_file`")


def load(args: argparse.Namespace, environ: Mapping[str, str]) -> ServeSettings:
    """`serve`'s settings from every layer; ConfigError (one line, exit 2) on any mistake."""
    path = config_path(args, environ)
    table = config_table(path, "serve") if path else None
    values = resolve(SERVE_OPTIONS, args, environ, table=table,
                     table_source=f"config file {path}")
    settings = ServeSettings.from_values(values)
    check_files(settings)
    return settings


__all__ = ["SERVE_OPTIONS", "ServeSettings", "check_files",
           "load", "split_hostport"]
