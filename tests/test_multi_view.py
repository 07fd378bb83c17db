"""A view of the fleet that never goes stale, with real brokers and real agents.

- A scheduler started after the agents knows every node's current status within
  seconds: in AMQP mode the bridge answers its re-sync request (edgerun/bridge/resync.py);
  in direct mode exact status subscriptions make even RabbitMQ's MQTT plugin (no
  retained messages for wildcard filters) send the retained statuses again.
- Restarting `serve` with the embedded broker loses nothing queued: the store sends a
  node's unaccepted tasks again when it comes back.
- MQTT 5 clients get CONNACK 0x01 (unacceptable protocol version) at once from the
  embedded broker instead of hanging.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgerun.scheduler.app import App
from edgerun.scheduler.messaging.broker import EmbeddedBroker, connect_level

from .bridgekit import BridgeProcess
from .brokers import Mosquitto, free_port, wait_port, wait_until
from .mqttkit import Observer
from .rabbit import Rabbit
from .scheduler_kit import running_app, start_agent

# MQTT 5 CONNECT: protocol "MQTT" level 5, clean start, keep-alive 60, no properties,
# client id "v5"
MQTT5_CONNECT = bytes([0x10, 15, 0, 4, *b"MQTT", 5, 0x02, 0, 60, 0, 0, 2, *b"v5"])
MQTT311_CONNECT = bytes([0x10, 14, 0, 4, *b"MQTT", 4, 0x02, 0, 60, 0, 2, *b"v4"])


@pytest.fixture
def embedded() -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker("127.0.0.1", 0).start()
    yield broker
    broker.stop()


def exchange(port: int, data: bytes) -> bytes:
    """Send `data` as a new client; everything the broker answers until it closes (or 10 s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        out = b""
        try:
            while chunk := sock.recv(100):
                out += chunk
                if data[0] == 0x10 and connect_level(data) == 4 and len(out) >= 4:
                    break  # a 3.1.1 client stays connected: its CONNACK is enough
        except TimeoutError:
            pass
        return out


# --- MQTT 5 and hostile first packets ---------------------------------------------------
def test_connect_level_reads_the_protocol_level() -> None:
    assert connect_level(MQTT5_CONNECT) == 5
    assert connect_level(MQTT311_CONNECT) == 4
    assert connect_level(b"\x30\x00") is None  # a PUBLISH
    assert connect_level(b"\x10\x02\x00") is None  # cut short


def test_an_mqtt5_client_is_refused_at_once(embedded: EmbeddedBroker) -> None:
    assert exchange(embedded.port, MQTT5_CONNECT) == b"\x20\x02\x00\x01"  # then closed
    assert exchange(embedded.port, MQTT311_CONNECT)[:4] == b"\x20\x02\x00\x00"


@pytest.mark.skipif(shutil.which("mosquitto_sub") is None, reason="mosquitto_sub missing")
def test_mosquitto_sub_v5_gets_an_answer_not_a_hang(embedded: EmbeddedBroker) -> None:
    done = subprocess.run(["mosquitto_sub", "-V", "5", "-h", "127.0.0.1", "-p",
                           str(embedded.port), "-t", "x", "-C", "1", "-W", "20"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "Unsupported Protocol Version" in done.stderr + done.stdout, done


@pytest.mark.parametrize("first", [
    b"\x30\x05\x00\x01xab",  # a PUBLISH before any CONNECT
    b"\x10\xff\xff\xff\x7f",  # a CONNECT claiming 256 MiB
    b"\x10\xff\xff\xff\xff\x01",  # a remaining length of five bytes
    b"\x10\x04\x00",  # a CONNECT cut short, then the client leaves
])
def test_a_bad_first_packet_is_closed_without_a_connack(embedded: EmbeddedBroker,
                                                        first: bytes) -> None:
    assert exchange(embedded.port, first) == b""
    assert exchange(embedded.port, MQTT311_CONNECT)[:4] == b"\x20\x02\x00\x00"  # still serving


# --- the embedded broker's restart loses nothing queued ---------------------------------
def test_a_task_queued_for_an_offline_node_survives_an_embedded_broker_restart(
        tmp_path: Path) -> None:
    port = free_port()
    db = str(tmp_path / "sched.db")
    over: dict[str, Any] = {"embedded_broker": f"127.0.0.1:{port}", "db": db,
                            "client_id": "sched-restart"}
    broker = f"mqtt://127.0.0.1:{port}"
    with running_app(None, tmp_path, **over) as app:
        store = app.service.store  # type: ignore[union-attr]
        agent = start_agent(broker, "er-1", tmp_path)
        assert wait_until(lambda: getattr(store.node("er-1"), "state", None) == "online", 30)
        agent.terminate()
        assert wait_until(lambda: store.node("er-1").state == "offline", 30)
        task = app.service.dispatch(["er-1"], False, {  # type: ignore[union-attr]
            "type": "shell", "command": "echo kept", "timeout": 30})[0]
        assert wait_until(lambda: store.get("er-1", task.id).state == "dispatched", 30)
    # the scheduler and its embedded broker restart: amqtt forgot the queued task
    with running_app(None, tmp_path, **over) as app:
        store = app.service.store  # type: ignore[union-attr]
        agent = start_agent(broker, "er-1", tmp_path)
        try:
            assert wait_until(lambda: store.get("er-1", task.id).state == "succeeded",
                              60), store.get("er-1", task.id)
            assert store.get("er-1", task.id).result["stdout"] == "kept\n"
        finally:
            agent.terminate()


# --- re-sync: a scheduler started after the agents ---------------------------------------
class MqttRabbit(Rabbit):
    """A private RabbitMQ with its MQTT plugin enabled, listening on a port of its own."""

    def __init__(self, workdir: Path) -> None:
        self.mqtt_port = free_port()
        super().__init__(workdir, f"mqtt.listeners.tcp.default = 127.0.0.1:{self.mqtt_port}\n"
                                  f"mqtt.allow_anonymous = true\n")
        (self.dir / "plugins-mqtt").write_text("[rabbitmq_mqtt].\n")

    def env(self) -> dict[str, str]:
        return {**super().env(), "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "plugins-mqtt")}

    def start(self) -> MqttRabbit:
        if not self.private:
            pytest.skip("rabbitmq-server missing: a private node is needed for its plugin")
        super().start()
        wait_port(self.mqtt_port, timeout=60)
        return self

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"


def _node_state(app: App, node: str) -> str | None:
    info = app.service.store.node(node)  # type: ignore[union-attr]
    return info.state if info else None


@pytest.mark.parametrize("kind", ["mosquitto", "rabbitmq-mqtt"])
def test_direct_mode_restarted_scheduler_learns_what_changed_while_it_was_away(
        tmp_path: Path, kind: str) -> None:
    """The node went offline while no scheduler ran; a new one (new client id: no
    session, so nothing queued for it) with the restored store sees it at once."""
    broker: Any = Mosquitto(tmp_path / "m").start() if kind == "mosquitto" \
        else MqttRabbit(tmp_path / "r").start()
    url = broker.url if kind == "mosquitto" else broker.mqtt_url
    db = str(tmp_path / "restored.db")
    try:
        with running_app(url, tmp_path, db=db) as app:
            agent = start_agent(url, "rs-1", tmp_path)
            assert wait_until(lambda: _node_state(app, "rs-1") == "online", 30)
        agent.terminate()  # publishes its retained offline status: nobody records it
        with running_app(url, tmp_path, db=db) as app:  # a new client id
            assert wait_until(lambda: _node_state(app, "rs-1") == "offline", 15), \
                f"the restarted scheduler still thinks rs-1 is {_node_state(app, 'rs-1')}"
            agent = start_agent(url, "rs-1", tmp_path)
            assert wait_until(lambda: _node_state(app, "rs-1") == "online", 30)
            agent.terminate()
    finally:
        broker.stop()


def test_amqp_scheduler_started_after_the_agents_knows_them(tmp_path: Path) -> None:
    rabbit = Rabbit(tmp_path / "rabbit").start()
    mosquitto = Mosquitto(tmp_path / "mosquitto").start()
    bridge = BridgeProcess(mosquitto.url, rabbit.url, tmp_path / "bridge")
    agents = []
    try:
        bridge.start().wait_ready()
        agents = [start_agent(mosquitto.url, f"late-{i}", tmp_path) for i in range(3)]
        # their online statuses went through the bridge before any scheduler queue existed
        with Observer(mosquitto.url) as seen:
            assert wait_until(lambda: {s["node"] for s in seen.of("status", state="online")}
                              == {f"late-{i}" for i in range(3)}, 30)
        with running_app(rabbit.url, tmp_path) as app:  # a new store and a new queue
            assert wait_until(lambda: all(_node_state(app, f"late-{i}") == "online"
                                          for i in range(3)), 15), \
                [_node_state(app, f"late-{i}") for i in range(3)]
    finally:
        for agent in agents:
            agent.terminate()
        if bridge.alive():
            bridge.terminate()
        mosquitto.stop()
        rabbit.stop()


# --- forgetting a node ---------------------------------------------------------------------
def test_nodes_forget_removes_a_node_and_says_so(tmp_path: Path) -> None:
    from .scheduler_kit import cli
    mosquitto = Mosquitto(tmp_path / "mosquitto").start()
    try:
        with running_app(mosquitto.url, tmp_path) as app:
            store = app.service.store  # type: ignore[union-attr]
            for node in ("fg-1", "fg-2"):
                agent = start_agent(mosquitto.url, node, tmp_path)
                assert wait_until(lambda n=node: _node_state(app, n) == "online", 30)
                agent.terminate()
            assert wait_until(lambda: _node_state(app, "fg-1") == "offline", 30)
            done = cli(app.api_url, "nodes", "forget", "fg-1")
            assert done.code == 0 and "forgot node fg-1" in done.out, done
            assert store.node("fg-1") is None and store.node("fg-2") is not None
            again = cli(app.api_url, "nodes", "forget", "fg-1")
            assert again.code == 3 and "fg-1" in again.err, again  # unknown node: exit 3
            assert cli(app.api_url, "nodes", "forget").code == 2  # no id: a usage error
    finally:
        mosquitto.stop()
