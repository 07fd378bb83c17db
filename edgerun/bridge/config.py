"""The bridge's settings: defaults < TOML file < EDGERUN_* < flags; routes from the file."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from edgerun import __version__
from edgerun.errors import ConfigError
from edgerun.protocol import (
    BRIDGE_TASKS_QUEUE, DEFAULT_PREFIX, EVENTS_EXCHANGE, TASKS_EXCHANGE, is_prefix,
    normalise_node_id,
)
from edgerun.settings import (
    BrokerURL, Option, build_parser, config_path, parse_broker_urls, read_toml, resolve,
)

from .routes import RouteTable, build_table, default_specs

PROG = "edgerun-bridge"


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _not_negative(value: int) -> str | None:
    return None if value >= 0 else "must be 0 or more"


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be 0 (off) to 65535"


def _prefix(value: str) -> str | None:
    return None if is_prefix(value) else "must be one topic level without / + #"


def _group(value: str) -> str | None:
    bad = set(value) & set("/+#")
    return "must not hold / + #" if bad else None


def _level(value: str) -> str | None:
    return None if value.upper() in ("DEBUG", "INFO", "WARNING", "ERROR") else \
        "must be debug, info, warning or error"


def _queue_type(value: str) -> str | None:
    return None if value in ("classic", "quorum") else "must be classic or quorum"


OPTIONS = [
    Option("mqtt", str, None, "MQTT broker URL, mqtt://user:pass@host:port or mqtts://; "
           "several nodes of one cluster comma-separated", metavar="URL[,URL]"),
    Option("amqp", str, None, "RabbitMQ URL, amqp://user:pass@host:port/vhost or amqps://; "
           "several nodes of one cluster comma-separated", metavar="URL[,URL]"),
    Option("client_id", str, None, "stable MQTT client id of this bridge's persistent session "
           "(default: edgerun-bridge-<host name>)"),
    Option("share_group", str, "", "subscribe as $share/GROUP/... so that several bridges "
           "share the MQTT messages (empty: plain subscriptions)", _group, metavar="GROUP"),
    Option("prefix", str, DEFAULT_PREFIX, "first topic level of the default routes", _prefix),
    Option("tasks_exchange", str, TASKS_EXCHANGE, "exchange of the default tasks route"),
    Option("events_exchange", str, EVENTS_EXCHANGE, "exchange of the default event routes"),
    Option("tasks_queue", str, BRIDGE_TASKS_QUEUE, "queue of the default tasks route"),
    Option("queue_type", str, "classic", "x-queue-type of the bridge's queues: classic or quorum",
           _queue_type),
    Option("prefetch", int, 500, "AMQP->MQTT window: deliveries in flight per bridge",
           _positive, metavar="N"),
    Option("confirm_window", int, 1000, "MQTT->AMQP window: publishes awaiting a confirm",
           _positive, metavar="N"),
    Option("mqtt_inflight", int, 0, "MQTT publishes awaiting a PUBACK at once (0: no limit "
           "but prefetch, which bounds them anyway)", _not_negative, metavar="N"),
    Option("qos0_per_topic", int, 1 << 20, "bytes of QoS 0 messages (live output) held per "
           "topic, i.e. per node and route; more is dropped and counted", _positive,
           metavar="BYTES"),
    Option("qos0_total", int, 32 << 20, "bytes of QoS 0 messages held in all", _positive,
           metavar="BYTES"),
    Option("ca_file", str, None, "CA certificates for mqtts:// and amqps:// "
           "(default: the system's)", metavar="FILE"),
    Option("cert_file", str, None, "client certificate for mqtts:// and amqps://",
           metavar="FILE"),
    Option("key_file", str, None, "client certificate key", metavar="FILE"),
    Option("keepalive", int, 30, "MQTT keepalive and AMQP heartbeat, seconds", _positive,
           metavar="S"),
    Option("metrics_address", str, "0.0.0.0", "address of the /metrics and /healthz server",  # noqa: S104
           metavar="ADDR"),
    Option("metrics_port", int, 9580, "port of /metrics and /healthz (0: off)", _port,
           metavar="PORT"),
    Option("drain_timeout", float, 15.0, "seconds SIGTERM waits for messages in flight",
           metavar="S"),
    Option("log_level", str, "info", "debug, info, warning or error", _level),
]


@dataclass(frozen=True)
class BridgeConfig:
    mqtt: BrokerURL
    amqp: BrokerURL
    routes: RouteTable
    client_id: str
    share_group: str = ""
    queue_type: str = "classic"
    prefetch: int = 500
    confirm_window: int = 1000
    mqtt_inflight: int = 0
    qos0_per_topic: int = 1 << 20
    qos0_total: int = 32 << 20
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: int = 30
    metrics_address: str = "0.0.0.0"  # noqa: S104 - Prometheus scrapes from elsewhere
    metrics_port: int = 9580
    drain_timeout: float = 15.0
    log_level: str = "INFO"
    mqtt_nodes: tuple[BrokerURL, ...] = ()  # every node of each cluster, the first first
    amqp_nodes: tuple[BrokerURL, ...] = ()

    @property
    def vhost(self) -> str:
        return unquote(self.amqp.path[1:]) if len(self.amqp.path) > 1 else "/"


def default_client_id() -> str:
    return f"edgerun-bridge-{normalise_node_id(socket.gethostname()) or 'host'}"


def load(argv: Sequence[str] | None, environ: Mapping[str, str]) -> BridgeConfig:
    """Read every layer and the route table; ConfigError (one line) on any mistake."""
    parser = build_parser(PROG, "Forward messages between MQTT topics and RabbitMQ exchanges "
                          "through a route table.", OPTIONS, __version__)
    args = parser.parse_args(argv)
    path = config_path(args, environ)
    table: dict[str, Any] = read_toml(path) if path else {}
    route_specs = table.pop("route", None)
    values = resolve(OPTIONS, args, environ, table=table, table_source=f"config file {path}")
    for key in ("mqtt", "amqp"):
        if not values[key]:
            raise ConfigError(f"no {key.upper()} broker: give --{key} URL, EDGERUN_{key.upper()} "
                              f"or `{key}` in the config file")
    mqtt_nodes = parse_broker_urls(values["mqtt"], ("mqtt", "mqtts"))
    amqp_nodes = parse_broker_urls(values["amqp"], ("amqp", "amqps"))
    for key in ("ca_file", "cert_file", "key_file"):
        if values[key] and not os.path.isfile(values[key]):
            raise ConfigError(f"`{key}` {values[key]}: no such file")
    if route_specs is None:
        route_specs = default_specs(values["prefix"], values["tasks_exchange"],
                                    values["events_exchange"], values["tasks_queue"])
    elif not isinstance(route_specs, list) or not all(isinstance(s, dict) for s in route_specs):
        raise ConfigError(f"config file {path}: `route` must be an array of tables, [[route]]")
    try:
        routes = build_table(route_specs)
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}" if path else str(exc)) from None
    return BridgeConfig(
        mqtt=mqtt_nodes[0], amqp=amqp_nodes[0], mqtt_nodes=mqtt_nodes, amqp_nodes=amqp_nodes,
        routes=routes,
        client_id=values["client_id"] or default_client_id(),
        share_group=values["share_group"], queue_type=values["queue_type"],
        prefetch=values["prefetch"], confirm_window=values["confirm_window"],
        mqtt_inflight=values["mqtt_inflight"], qos0_per_topic=values["qos0_per_topic"],
        qos0_total=values["qos0_total"], ca_file=values["ca_file"],
        cert_file=values["cert_file"], key_file=values["key_file"],
        keepalive=values["keepalive"], metrics_address=values["metrics_address"],
        metrics_port=values["metrics_port"], drain_timeout=max(0.0, values["drain_timeout"]),
        log_level=values["log_level"].upper())
