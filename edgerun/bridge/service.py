"""The bridge as a whole: MQTT connections, an AMQP link, the pump between them.

QoS 0 subscriptions (live output) get an MQTT connection of their own (clean
session, client id `<client_id>-live`): the broker writes each connection's
messages in order, so on one connection a node flooding its output would put
megabytes in front of every other node's updates. On their own connection the
updates and statuses never queue behind it.
"""

from __future__ import annotations

import logging
import threading
import time

from edgerun.amqp import AmqpLink, QueueSpec, Topology
from edgerun.mqtt import MqttConnection, TLSFiles
from edgerun.settings import BrokerURL

from .config import BridgeConfig
from .metrics import BrokerStatus, HttpServer, Metrics, Status
from .pump import Pump
from .resync import Resync, resubscriber

log = logging.getLogger(__name__)


def subscriptions(cfg: BridgeConfig, qos0: bool | None = None) -> list[tuple[str, int]]:
    """The route table's subscriptions (only those at QoS 0, or only the others),
    shared as `$share/GROUP/...` when asked."""
    share = f"$share/{cfg.share_group}/" if cfg.share_group else ""
    return [(share + topic, qos) for topic, qos in cfg.routes.subscriptions()
            if qos0 is None or (qos == 0) == qos0]


def topology(cfg: BridgeConfig) -> Topology:
    """Every exchange a route uses, and one durable queue per AMQP->MQTT route."""
    arguments = (("x-queue-type", "quorum"),) if cfg.queue_type == "quorum" else ()
    return Topology(
        exchanges=tuple(cfg.routes.exchanges().items()),
        queues=tuple(QueueSpec(r.queue, ((r.exchange, r.binding_key),), arguments=arguments)
                     for r in cfg.routes.amqp_to_mqtt),
        prefetch=cfg.prefetch)


def _address(url: BrokerURL | None) -> str | None:
    return url.address if url is not None else None


class Bridge:
    def __init__(self, cfg: BridgeConfig) -> None:
        self.cfg = cfg
        self.stopping = threading.Event()
        self.metrics = Metrics(cfg.routes)
        self.pump = Pump(cfg.routes, self.metrics, cfg.confirm_window,
                         qos0_per_topic=cfg.qos0_per_topic, qos0_total=cfg.qos0_total)
        self.mqtt = MqttConnection(
            cfg.mqtt_nodes or (cfg.mqtt,), cfg.client_id, on_message=self.pump.on_mqtt_message,
            on_connected=self.pump.on_mqtt_connected, subscriptions=subscriptions(cfg, False),
            clean_session=False, manual_ack=True, keepalive=cfg.keepalive,
            max_inflight=cfg.mqtt_inflight, name="bridge-mqtt", on_pass=self.pump.on_mqtt_pass,
            tls=TLSFiles(cfg.ca_file, cfg.cert_file, cfg.key_file))
        live = subscriptions(cfg, True)
        self.live = MqttConnection(
            cfg.mqtt_nodes or (cfg.mqtt,), f"{cfg.client_id}-live",
            on_message=self.pump.on_mqtt_message, subscriptions=live, clean_session=True,
            keepalive=cfg.keepalive, max_inflight=0, name="bridge-mqtt-live",
            on_pass=self.pump.on_mqtt_pass,
            tls=TLSFiles(cfg.ca_file, cfg.cert_file, cfg.key_file)) if live else None
        self.link = AmqpLink(cfg.amqp_nodes or (cfg.amqp,), topology(cfg), self.pump,
                             heartbeat=cfg.keepalive, name="bridge-amqp",
                             tls=TLSFiles(cfg.ca_file, cfg.cert_file, cfg.key_file))
        self.pump.attach(self.mqtt, self.link)
        # a scheduler's re-sync request: the broker sends the retained statuses again
        self.resync = Resync(cfg.amqp_nodes or (cfg.amqp,),
                             resubscriber(self.mqtt, subscriptions(cfg, False)),
                             tls=TLSFiles(cfg.ca_file, cfg.cert_file, cfg.key_file))
        self.metrics.watch(self.status)
        self.http: HttpServer | None = None
        if cfg.metrics_port:
            self.http = HttpServer(cfg.metrics_address, cfg.metrics_port, self.metrics,
                                   self.status)

    def status(self) -> Status:
        return Status(
            brokers={
                "mqtt": BrokerStatus(self.mqtt.connected.is_set(), self.mqtt.reconnects,
                                     self.mqtt.last_error, _address(self.mqtt.node)),
                "amqp": BrokerStatus(self.link.ready, self.link.reconnects,
                                     self.link.last_error, _address(self.link.node)),
                **({"mqtt-live": BrokerStatus(self.live.connected.is_set(),
                                              self.live.reconnects, self.live.last_error,
                                              _address(self.live.node))} if self.live else {})},
            in_flight={"mqtt_to_amqp": self.pump.to_amqp_in_flight,
                       "amqp_to_mqtt": self.pump.to_mqtt_in_flight})

    def run(self) -> int:
        """Forward until stop(); then drain what is in flight and return 0."""
        if self.http:
            self.http.start()
        self.link.start()
        self.mqtt.start()
        if self.live:
            self.live.start()
        self.resync.start()
        routes = ", ".join(f"{r.name} ({r.direction})" for r in self.cfg.routes.routes)
        log.info("bridging %s and %s as %s; routes: %s", self.cfg.mqtt, self.cfg.amqp,
                 self.cfg.client_id, routes)
        self.stopping.wait()
        self._drain()
        return 0

    def stop(self) -> None:
        self.stopping.set()

    def _drain(self) -> None:
        log.info("stopping: draining what is in flight (at most %.0f s)", self.cfg.drain_timeout)
        if self.live:
            self.live.stop()  # QoS 0: nothing to drain
        self.pump.begin_drain()
        deadline = time.monotonic() + self.cfg.drain_timeout
        while not self.pump.drained() and time.monotonic() < deadline:
            self.pump.progress.wait(0.1)  # set at each confirm and PUBACK
            self.pump.progress.clear()
        self.resync.stop()
        self.link.stop()
        self.mqtt.flush(min(5.0, max(0.5, deadline - time.monotonic())))
        self.mqtt.stop()
        if self.http:
            self.http.stop()
        status = self.status().in_flight
        log.info("stopped; left in flight (redelivered to the next run): %s", dict(status))
