"""/metrics (Prometheus) and /healthz, and the counters behind them.

Labels are route names, directions, drop reasons and broker names: a fixed
set, so the number of series never grows with the number of node ids.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .routes import RouteTable

log = logging.getLogger(__name__)

DROP_REASONS = ("no_route", "bad_topic", "bad_value", "over_budget")
BROKERS = ("mqtt", "amqp")


@dataclass(frozen=True)
class BrokerStatus:
    connected: bool
    reconnects: int
    last_error: str | None
    node: str | None = None  # host:port of the cluster node connected to


@dataclass(frozen=True)
class Status:
    brokers: Mapping[str, BrokerStatus]
    in_flight: Mapping[str, int]  # direction -> messages

    @property
    def healthy(self) -> bool:
        return all(b.connected for b in self.brokers.values())

    def as_json(self) -> dict[str, Any]:
        return {"status": "ok" if self.healthy else "degraded",
                "in_flight": dict(self.in_flight),
                **{name: {"connected": b.connected, "reconnects": b.reconnects,
                          "last_error": b.last_error, "node": b.node}
                   for name, b in self.brokers.items()}}


@dataclass
class _DropLog:
    """Log the first drop of each kind at once and the rest at most every `every` seconds."""

    every: float = 10.0
    _last: dict[tuple[str, str], float] = field(default_factory=dict)
    _quiet: dict[tuple[str, str], int] = field(default_factory=dict)

    def note(self, route: str, reason: str, detail: str) -> None:
        key, now = (route, reason), time.monotonic()
        if now - self._last.get(key, -self.every) < self.every:
            self._quiet[key] = self._quiet.get(key, 0) + 1
            return
        more = self._quiet.pop(key, 0)
        self._last[key] = now
        log.warning("route %s: dropped a message (%s): %s%s", route, reason, detail,
                    f" (and {more} more since the last report)" if more else "")


class Metrics:
    def __init__(self, routes: RouteTable) -> None:
        self.registry = CollectorRegistry()
        self.forwarded = Counter("edgerun_bridge_forwarded", "Messages forwarded (confirmed by "
                                 "the receiving broker), per route", ["route", "direction"],
                                 registry=self.registry)
        self.dropped = Counter("edgerun_bridge_dropped", "Messages dropped because their topic, "
                               "routing key or a placeholder value broke the route, or (QoS 0 "
                               "only) over the budget of their topic",
                               ["route", "reason"], registry=self.registry)
        self.nacked = Counter("edgerun_bridge_nacked", "Publishes RabbitMQ refused (basic.nack) "
                              "and the bridge sent again", ["route"], registry=self.registry)
        self._drop_log = _DropLog()
        self._lock = threading.Lock()
        for route in routes.routes:
            self.forwarded.labels(route.name, str(route.direction))
            for reason in DROP_REASONS[1:]:
                self.dropped.labels(route.name, reason)
            self.nacked.labels(route.name)
        self.dropped.labels("none", "no_route")

    def drop(self, route: str, reason: str, detail: str) -> None:
        self.dropped.labels(route, reason).inc()
        with self._lock:
            self._drop_log.note(route, reason, detail)

    def watch(self, status: Callable[[], Status]) -> None:
        """Publish the live status (in flight, connections, reconnects, last error)."""
        self.registry.register(_StatusCollector(status))


class _StatusCollector(Collector):
    def __init__(self, status: Callable[[], Status]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        in_flight = GaugeMetricFamily("edgerun_bridge_in_flight",
                                      "Messages taken from one broker and not yet confirmed by "
                                      "the other", labels=["direction"])
        for direction, count in status.in_flight.items():
            in_flight.add_metric([direction], count)
        connected = GaugeMetricFamily("edgerun_bridge_connected",
                                      "1 while the broker connection is up", labels=["broker"])
        reconnects = CounterMetricFamily("edgerun_bridge_reconnects",
                                         "Connections made again after the first",
                                         labels=["broker"])
        errors = GaugeMetricFamily("edgerun_bridge_last_error_info",
                                   "The last connection error of each broker, in a label",
                                   labels=["broker", "error"])
        nodes = GaugeMetricFamily("edgerun_bridge_broker_node_info",
                                  "The node (host:port) of each broker connected to now",
                                  labels=["broker", "node"])
        for name, broker in status.brokers.items():
            connected.add_metric([name], 1 if broker.connected else 0)
            reconnects.add_metric([name], broker.reconnects)
            if broker.last_error:
                errors.add_metric([name, broker.last_error[:300]], 1)
            if broker.connected and broker.node:
                nodes.add_metric([name, broker.node], 1)
        yield from (in_flight, connected, reconnects, errors, nodes)


class HttpServer:
    """A small threaded HTTP server for /metrics and /healthz."""

    def __init__(self, address: str, port: int, metrics: Metrics,
                 status: Callable[[], Status]) -> None:
        handler = _handler(metrics.registry, status)
        self._server = ThreadingHTTPServer((address, port), handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(registry: CollectorRegistry,
             status: Callable[[], Status]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            elif path == "/healthz":
                now = status()
                self._send(200 if now.healthy else 503, "application/json",
                           json.dumps(now.as_json()).encode())
            else:
                self._send(404, "text/plain", b"try /metrics or /healthz\n")

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http: " + format, *args)

    return Handler
