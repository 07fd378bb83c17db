"""`/metrics`: Prometheus text exposition from a private registry."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Snapshot:
    """Gauges read from the store and the messenger at scrape time."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self.read = read

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        data = self.read()
        tasks = GaugeMetricFamily("edgerun_scheduler_tasks", "Tasks in the store by state",
                                  labels=["state"])
        for state, count in sorted(data["tasks"].items()):
            tasks.add_metric([state], count)
        yield tasks
        nodes = GaugeMetricFamily("edgerun_scheduler_nodes", "Known nodes by state",
                                  labels=["state"])
        for state, count in sorted(data["nodes"].items()):
            nodes.add_metric([state], count)
        yield nodes
        yield GaugeMetricFamily("edgerun_scheduler_broker_connected",
                                "1 while the broker connection is up", value=data["connected"])
        node = GaugeMetricFamily("edgerun_scheduler_broker_node_info",
                                 "The broker node (host:port) the scheduler is connected to, "
                                 "in a label", labels=["node"])
        if data.get("broker_node"):
            node.add_metric([data["broker_node"]], 1)
        yield node
        yield GaugeMetricFamily("edgerun_scheduler_event_subscribers",
                                "Clients following the live event stream",
                                value=data["subscribers"])


class Metrics:
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.messages = Counter("edgerun_scheduler_messages", "Messages received, by channel",
                                ["channel"], registry=self.registry)
        self.bad_messages = Counter("edgerun_scheduler_bad_messages",
                                    "Messages that broke the contract and were dropped",
                                    registry=self.registry)
        self.ignored = Counter("edgerun_scheduler_updates_ignored",
                               "Updates that were duplicates or arrived after a later state",
                               registry=self.registry)
        self.changes = Counter("edgerun_scheduler_task_changes",
                               "Task state changes, by new state", ["state"],
                               registry=self.registry)
        self.dispatched = Counter("edgerun_scheduler_dispatched",
                                  "Tasks and cancels the broker took from the scheduler",
                                  registry=self.registry)
        self.registry.register(_Snapshot(snapshot))

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
