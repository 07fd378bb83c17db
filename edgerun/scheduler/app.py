"""`edgerun serve` put together: embedded broker (optional), messenger, store, service, API.

`App` is also what the demo and the tests start in-process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgerun.errors import ConfigError
from edgerun.protocol import DEFAULT_PREFIX, is_prefix
from edgerun.settings import Option, TLSFiles, parse_broker_url
from edgerun.signing import Signer

from .api import ApiServer
from .broker import EmbeddedBroker
from .errors import BrokerUnreachable
from .messaging import Messenger
from .service import Service, ServiceConfig
from .store import Store

log = logging.getLogger(__name__)


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


def _level(value: str) -> str | None:
    return None if value.upper() in ("DEBUG", "INFO", "WARNING", "ERROR") else \
        "must be debug, info, warning or error"


SERVE_OPTIONS = [
    Option("broker", str, None, "broker URL: mqtt://, mqtts:// (direct) or amqp://, amqps:// "
           "(through the bridge); default: the embedded broker when one is started",
           metavar="URL"),
    Option("embedded_broker", str, None, "start the embedded MQTT broker (amqtt) on HOST:PORT",
           _hostport, metavar="HOST:PORT"),
    Option("db", str, "edgerun-scheduler.db", "SQLite file of the task store", metavar="FILE"),
    Option("listen", str, "127.0.0.1:8470", "HOST:PORT of the HTTP API", _hostport,
           metavar="HOST:PORT"),
    Option("prefix", str, DEFAULT_PREFIX, "first MQTT topic level", _prefix),
    Option("grace", float, 30.0, "seconds past a task's timeout before it is declared lost",
           _not_negative, metavar="S"),
    Option("tick", float, 1.0, "seconds between deadline checks", _positive, metavar="S"),
    Option("default_expiry", float, 86_400.0, "a task not taken within this many seconds "
           "expires (0: never)", _not_negative, metavar="S"),
    Option("events_topic", str, None, "MQTT topic prefix of the full-data events "
           "(default {prefix}/events; empty: none)", metavar="TOPIC"),
    Option("audit_exchange", str, "edgerun.audit", "AMQP exchange of the full-data events "
           "(empty: none)", metavar="NAME"),
    Option("tasks_exchange", str, "edgerun.tasks", "AMQP exchange tasks are published to",
           metavar="NAME"),
    Option("events_exchange", str, "edgerun.events", "AMQP exchange the bridge publishes "
           "updates, output and status to", metavar="NAME"),
    Option("queue", str, "edgerun.scheduler", "durable AMQP queue of this scheduler",
           metavar="NAME"),
    Option("client_id", str, "edgerun-scheduler", "MQTT client id (persistent session)",
           metavar="ID"),
    Option("record_external", bool, True, "record tasks other clients publish"),
    Option("ca_file", str, None, "CA certificates for mqtts:// and amqps://", metavar="FILE"),
    Option("cert_file", str, None, "client certificate for mqtts:// and amqps://",
           metavar="FILE"),
    Option("key_file", str, None, "key of the client certificate", metavar="FILE"),
    Option("private_key", str, None, "Ed25519 private key (PEM, from `edgerun keygen`) to "
           "sign every task and cancel with", metavar="FILE"),
    Option("connect_timeout", float, 15.0, "seconds to wait for the broker at start-up",
           _positive, metavar="S"),
    Option("log_level", str, "info", "debug, info, warning or error", _level),
]


def split_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{value!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass
class App:
    """The running service; `start()` raises BrokerUnreachable if the broker never answers."""

    values: Mapping[str, Any]
    embedded: EmbeddedBroker | None = None
    service: Service | None = None
    api: ApiServer | None = None
    stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def api_url(self) -> str:
        assert self.api is not None
        return self.api.url

    def start(self) -> App:
        v = self.values
        try:
            if v.get("embedded_broker"):
                host, port = split_hostport(v["embedded_broker"])
                self.embedded = EmbeddedBroker(host, port).start()
            url = v.get("broker") or (self.embedded.url if self.embedded else None)
            if not url:
                raise ConfigError("no broker: give --broker URL (mqtt://, amqp://, ...) or "
                                  "--embedded-broker HOST:PORT")
            messenger = self._messenger(url)
            signer = Signer.from_file(v["private_key"]) if v.get("private_key") else None
            store = Store(v.get("db") or "edgerun-scheduler.db")
            self.service = Service(store, messenger, ServiceConfig(
                grace=v.get("grace", 30.0), tick=v.get("tick", 1.0),
                default_expiry=v.get("default_expiry", 86_400.0)), signer=signer)
            host, port = split_hostport(v.get("listen") or "127.0.0.1:8470")
            self.api = ApiServer(self.service, host, port)
            self.service.start()
            self.api.start()
            if not messenger.connected.wait(v.get("connect_timeout", 15.0)):
                raise BrokerUnreachable(f"cannot reach the broker {messenger.url}: "
                                        f"{messenger.last_error or 'no answer'}")
        except BaseException:
            self.stop()
            raise
        log.info("edgerun scheduler: API on %s, broker %s (%s), store %s", self.api.url,
                 messenger.url, messenger.kind, store.path)
        return self

    def _messenger(self, url: str) -> Messenger:
        v = self.values
        broker = parse_broker_url(url, ("mqtt", "mqtts", "amqp", "amqps"))
        tls = TLSFiles(v.get("ca_file"), v.get("cert_file"), v.get("key_file"))
        if broker.scheme.startswith("amqp"):
            from .messaging.amqp import AmqpMessenger
            return AmqpMessenger(
                broker, tasks_exchange=v.get("tasks_exchange", "edgerun.tasks"),
                events_exchange=v.get("events_exchange", "edgerun.events"),
                audit_exchange=v.get("audit_exchange", "edgerun.audit"),
                queue=v.get("queue", "edgerun.scheduler"),
                record_external=v.get("record_external", True), tls=tls)
        from .messaging.mqtt import MqttMessenger
        return MqttMessenger(broker, prefix=v.get("prefix", DEFAULT_PREFIX),
                             client_id=v.get("client_id", "edgerun-scheduler"),
                             events_topic=v.get("events_topic"),
                             record_external=v.get("record_external", True),
                             tls=tls)

    def stop(self) -> None:
        if self.api is not None:
            self.api.stop()
        if self.service is not None:
            self.service.stop()
            self.service.store.close()
        if self.embedded is not None:
            self.embedded.stop()
        self.stopped.set()
