"""What bridge tests need: the bridge as a real process, and real clients on both sides.

`BridgeProcess` runs `python -m edgerun.bridge` and reads its /healthz and /metrics.
`AmqpSink` consumes an exchange through its own durable queue with plain pika
(BlockingConnection) and reconnects across RabbitMQ restarts; `MqttSink`
collects a topic over a persistent MQTT session. Both record message bodies,
so tests count the unique ones and compare bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
from prometheus_client.parser import text_string_to_metric_families

from edgerun.mqtt import Inbound, MqttConnection
from edgerun.settings import parse_broker_url

from .brokers import ChildProcess, free_port, wait_until
from .mqttkit import ROOT


def body(n: int, node: str, kind: str = "update", size: int = 128) -> bytes:
    """A unique JSON message of exactly `size` bytes."""
    head = f'{{"v":1,"kind":"{kind}","id":"m-{n:06d}","node":"{node}","pad":"'
    return (head + "x" * max(0, size - len(head) - 2) + '"}').encode()


class BridgeProcess(ChildProcess):
    def __init__(self, mqtt_url: str, amqp_url: str, workdir: Path, *args: str,
                 client_id: str | None = None) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.args = ["--mqtt", mqtt_url, "--amqp", amqp_url, "--metrics-port", str(self.port),
                     "--metrics-address", "127.0.0.1",
                     "--client-id", client_id or f"bridge-{uuid.uuid4().hex[:8]}", *args]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "bridge.log"

    def start(self) -> BridgeProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "edgerun.bridge", *self.args],
                                         stdout=log, stderr=log, env=env, cwd=self.dir)
        return self

    def health(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz",
                                        timeout=2) as reply:
                return dict(json.load(reply))
        except urllib.error.HTTPError as err:
            return dict(json.load(err))
        except (OSError, ValueError):
            return None

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        ok = wait_until(lambda: (self.health() or {}).get("status") == "ok", timeout)
        assert ok, f"bridge never became healthy: {self.health()}\n{self.log()[-3000:]}"
        return self.health() or {}

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics",
                                    timeout=2) as reply:
            text = reply.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


class _Sink:
    def __init__(self) -> None:
        self.received: list[tuple[str, bytes, Any]] = []  # destination, body, properties
        self._seen: set[bytes] = set()
        self.first_at: float | None = None  # monotonic times of the first and latest new body
        self.last_at: float | None = None
        self._cond = threading.Condition()

    def _record(self, where: str, payload: bytes, props: Any = None) -> None:
        with self._cond:
            self.received.append((where, payload, props))
            if payload not in self._seen:
                self._seen.add(payload)
                self.last_at = time.monotonic()
                self.first_at = self.first_at or self.last_at
            self._cond.notify_all()

    def bodies(self) -> set[bytes]:
        with self._cond:
            return set(self._seen)

    def unique(self) -> int:
        return len(self._seen)

    def wait_unique(self, count: int, timeout: float = 60.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self._seen) >= count, timeout)

    def wait_for(self, payload: bytes, timeout: float = 15.0) -> tuple[str, bytes, Any]:
        with self._cond:
            self._cond.wait_for(lambda: payload in self._seen, timeout)
            found = [r for r in self.received if r[1] == payload]
        assert found, f"never received {payload[:80]!r}"
        return found[0]


class AmqpSink(_Sink):
    """A durable queue bound to `exchange` with `binding`, consumed with manual acks."""

    def __init__(self, url: str, exchange: str, binding: str, exchange_type: str = "topic") -> None:
        super().__init__()
        self.url, self.exchange, self.binding = url, exchange, binding
        self.exchange_type = exchange_type
        self.queue = f"test-sink-{uuid.uuid4().hex[:8]}"
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="amqp-sink", daemon=True)

    def __enter__(self) -> AmqpSink:
        self._thread.start()
        assert self.ready.wait(30), "the AMQP sink could not declare its queue"
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._consume()
            except (pika.exceptions.AMQPError, OSError):
                self._stop.wait(0.2)  # the broker is restarting: try again

    def _consume(self) -> None:
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            ch = conn.channel()
            ch.exchange_declare(self.exchange, self.exchange_type, durable=True)
            ch.queue_declare(self.queue, durable=True)
            ch.queue_bind(self.queue, self.exchange, self.binding)
            ch.basic_qos(prefetch_count=1000)

            def on_message(channel: Any, method: Any, props: Any, payload: bytes) -> None:
                self._record(method.routing_key, payload, props)
                channel.basic_ack(method.delivery_tag)

            ch.basic_consume(self.queue, on_message)
            self.ready.set()
            while not self._stop.is_set():
                conn.process_data_events(time_limit=0.1)
        finally:
            if conn.is_open:
                try:
                    conn.close()
                except (pika.exceptions.AMQPError, OSError):
                    pass


class MqttSink(_Sink):
    """A persistent-session subscriber (QoS 1) that records every message."""

    def __init__(self, url: str, topics: Iterable[str]) -> None:
        super().__init__()
        self.conn = MqttConnection(parse_broker_url(url, ("mqtt", "mqtts")),
                                   f"sink-{uuid.uuid4().hex[:8]}", on_message=self._on_message,
                                   subscriptions=[(t, 1) for t in topics], clean_session=False,
                                   name="mqtt-sink", backoff_cap=0.5)

    def __enter__(self) -> MqttSink:
        self.conn.start()
        assert self.conn.connected.wait(10), "the MQTT sink could not connect"
        return self

    def __exit__(self, *_exc: object) -> None:
        self.conn.stop()

    def _on_message(self, msg: Inbound) -> None:
        self._record(msg.topic, msg.payload, msg.retain)


def publish_mqtt(url: str, messages: Iterable[tuple[str, bytes]], qos: int = 1,
                 retain: bool = False) -> None:
    """Publish and wait until the broker acknowledged every message."""
    conn = MqttConnection(parse_broker_url(url, ("mqtt", "mqtts")),
                          f"pub-{uuid.uuid4().hex[:8]}", clean_session=True, name="mqtt-pub",
                          max_inflight=1000, backoff_cap=0.5)
    conn.start()
    try:
        assert conn.connected.wait(10), "publisher could not connect"
        for topic, payload in messages:
            conn.publish(topic, payload, qos, retain)
        assert conn.flush(120), "the broker did not acknowledge every publish"
    finally:
        conn.stop()


def publish_qos0(url: str, messages: Iterable[tuple[str, bytes]], timeout: float = 120) -> None:
    """QoS 0 publishes, returning once every one was written to the socket: `flush` only
    waits for QoS 1 acknowledgements, and a connection stopped with QoS 0 messages still
    queued drops them (how many got out would depend on the machine's load)."""
    conn = MqttConnection(parse_broker_url(url, ("mqtt", "mqtts")),
                          f"pub0-{uuid.uuid4().hex[:8]}", clean_session=True, name="mqtt-pub0",
                          backoff_cap=0.5)
    written = threading.Semaphore(0)
    conn.start()
    try:
        assert conn.connected.wait(10), "publisher could not connect"
        count = 0
        for topic, payload in messages:
            conn.publish(topic, payload, 0, on_sent=written.release)
            count += 1
        deadline = time.monotonic() + timeout
        for _ in range(count):
            assert written.acquire(timeout=max(0.0, deadline - time.monotonic())), \
                "QoS 0 messages were not written in time"
    finally:
        conn.stop()


def publish_amqp(url: str, exchange: str, messages: Iterable[tuple[str, bytes]],
                 batch: int = 500, persistent: bool = True) -> None:
    """Plain pika, in transactions: when this returns, RabbitMQ has every message on disk."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.exchange_declare(exchange, "topic", durable=True)
        ch.tx_select()
        props = pika.BasicProperties(content_type="application/json",
                                     delivery_mode=2 if persistent else None)
        pending = 0
        for key, payload in messages:
            ch.basic_publish(exchange, key, payload, props)
            pending += 1
            if pending == batch:
                ch.tx_commit()
                pending = 0
        ch.tx_commit()
    finally:
        conn.close()
