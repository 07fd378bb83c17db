"""The shipped Mosquitto ACL: a node reads only its own tasks and writes only its own topics.

"Nothing arrives" is proven by order, not by waiting: after the message that
must not arrive, a marker goes to a topic the client may read; Mosquitto
handles messages in order, so once the marker is in, a leak would be too.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest

from edgerun.mqtt import Inbound, MqttConnection
from edgerun.settings import parse_broker_url

from .brokers import Mosquitto, mosquitto_binary, wait_until
from .mqttkit import ROOT, AgentProcess, Observer, shell

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="needs a private mosquitto")
DEPLOY = ROOT / "deploy" / "mosquitto"
USERS = {"node-a": "pa", "node-b": "pb", "edgerun-scheduler": "ps", "edgerun-bridge": "pbr"}


@pytest.fixture
def secured(tmp_path: Path):
    passwd = tmp_path / "passwd"
    for user, password in USERS.items():
        subprocess.run([str(DEPLOY / "add-user.sh"), user, password, str(passwd)], check=True,
                       capture_output=True)
    extra = f"password_file {passwd}\nacl_file {DEPLOY / 'acl'}\n"
    broker = Mosquitto(tmp_path / "mosquitto", extra=extra, anonymous=False).start()
    yield broker
    broker.stop()


def url(broker: Mosquitto, user: str) -> str:
    return f"mqtt://{user}:{USERS[user]}@127.0.0.1:{broker.port}"


class Client:
    """A raw MQTT client logged in as someone, recording what it receives."""

    def __init__(self, address: str, client_id: str, topics: list[str]) -> None:
        self.got: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.conn = MqttConnection(parse_broker_url(address, ("mqtt",)), client_id,
                                   on_message=self._on, subscriptions=[(t, 1) for t in topics],
                                   clean_session=True)
        self.conn.start()
        assert self.conn.connected.wait(10)

    def _on(self, msg: Inbound) -> None:
        with self._lock:
            self.got.append((msg.topic, msg.payload))

    def topics(self) -> list[str]:
        with self._lock:
            return [t for t, _ in self.got]


def test_nodes_are_confined_to_their_own_topics(secured: Mosquitto, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with Observer(url(secured, "edgerun-scheduler")) as scheduler:
        agent_b = AgentProcess(url(secured, "node-b"), "node-b", tmp_path / "b").start()
        agent_b.wait_online(scheduler)
        # node A snoops on B's tasks (and its own, where the marker will come)
        snoop = Client(url(secured, "node-a"), "snooper",
                       ["edgerun/nodes/node-b/tasks", "edgerun/nodes/node-a/tasks",
                        "edgerun/nodes/+/updates", "edgerun/nodes/#"])
        subscribed = snoop.conn.flush(5)
        assert subscribed
        scheduler.send("node-b", shell("for-b", f"echo b >> {marker}"))
        assert scheduler.final("for-b")["state"] == "succeeded"  # B itself may read its tasks
        scheduler.send("node-a", b"marker")
        assert wait_until(lambda: "edgerun/nodes/node-a/tasks" in snoop.topics(), 10)
        assert snoop.topics() == ["edgerun/nodes/node-a/tasks"], "A read what is not its own"

        # A forges an update and a status for B, and a task for B
        forged = {"v": 1, "kind": "update", "id": "for-b", "node": "node-b", "state": "failed",
                  "at": "2026-11-22T06:00:00.000Z"}
        snoop.conn.publish("edgerun/nodes/node-b/updates", json.dumps(forged).encode(), 1)
        snoop.conn.publish("edgerun/nodes/node-b/status", b'{"v":1,"kind":"status",'
                           b'"node":"node-b","state":"offline"}', 1, True)
        snoop.conn.publish("edgerun/nodes/node-b/tasks",
                           json.dumps(shell("from-a", f"echo a >> {marker}")).encode(), 1)
        own = {**forged, "node": "node-a", "id": "a-own"}
        snoop.conn.publish("edgerun/nodes/node-a/updates", json.dumps(own).encode(), 1)
        assert scheduler.wait("update", id="a-own")  # A may write its own updates
        scheduler.send("node-b", shell("after", "true"))  # B's queue: from-a would be first
        assert scheduler.final("after")["state"] == "succeeded"
        assert [u["state"] for u in scheduler.updates("for-b")] == \
            ["accepted", "running", "succeeded"]
        assert scheduler.updates("from-a") == []
        assert not any(s["state"] == "offline" for s in scheduler.of("status", node="node-b"))
        assert marker.read_text() == "b\n"
        snoop.conn.stop()
        assert agent_b.terminate() == 0


def test_anonymous_and_wrong_passwords_are_refused(secured: Mosquitto, tmp_path: Path) -> None:
    wrong = f"mqtt://node-a:nope@127.0.0.1:{secured.port}"
    for number, address in enumerate((f"mqtt://127.0.0.1:{secured.port}", wrong)):
        agent = AgentProcess(address, "node-a", tmp_path / f"attempt-{number}")
        agent.start()
        assert wait_until(lambda a=agent: "refused the connection" in a.log(), 15), agent.log()
        assert "connected to" not in agent.log()
        assert agent.terminate() == 0


def test_add_user_rejects_a_bad_node_id(tmp_path: Path) -> None:
    done = subprocess.run([str(DEPLOY / "add-user.sh"), "bad/name", "pw", str(tmp_path / "p")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "not a valid node id" in done.stderr
