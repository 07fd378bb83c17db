"""The scheduler service in MQTT direct mode against a private Mosquitto and real agents."""

from __future__ import annotations

import json
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edgerun.mqtt import Inbound, MqttConnection
from edgerun.protocol import format_time
from edgerun.scheduler.app import App
from edgerun.settings import parse_broker_url

from .brokers import Mosquitto, wait_until
from .mqttkit import AgentProcess, Observer, shell
from .scheduler_kit import Api, running_app, serve_values, start_agent


@pytest.fixture
def app(mosquitto: Mosquitto, tmp_path: Path) -> Iterator[App]:
    with running_app(mosquitto.url, tmp_path) as running:
        yield running


@pytest.fixture
def api(app: App) -> Api:
    return Api(app.api_url)


@pytest.fixture
def agent(mosquitto: Mosquitto, api: Api, tmp_path: Path) -> Iterator[AgentProcess]:
    proc = start_agent(mosquitto.url, "node-a", tmp_path)
    api.wait_node("node-a")
    yield proc
    if proc.alive():
        proc.kill()


class Events:
    """A real MQTT client on the scheduler's full-data event topics."""

    def __init__(self, url: str) -> None:
        self.items: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.conn = MqttConnection(parse_broker_url(url, ("mqtt",)),
                                   f"events-{uuid.uuid4().hex[:6]}", on_message=self._on,
                                   subscriptions=[("edgerun/events/#", 1)], clean_session=True)

    def _on(self, msg: Inbound) -> None:
        with self._lock:
            self.items.append({"topic": msg.topic, **json.loads(msg.payload)})

    def of(self, task_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.items if e.get("id") == task_id]


def test_registry_follows_retained_status_and_last_will(
        mosquitto: Mosquitto, agent: AgentProcess, api: Api, tmp_path: Path) -> None:
    node = api.get("/nodes/node-a")
    assert node["state"] == "online" and node["agent"]
    assert {"hostname", "kernel", "arch", "macs", "ips", "cpus", "mem_bytes"} <= set(node["facts"])
    first_seen = node["first_seen"]
    # a scheduler that starts later learns the node from the retained status alone
    with running_app(mosquitto.url, tmp_path) as late:
        late_api = Api(late.api_url)
        late_api.wait_node("node-a", "online")
        agent.kill()
        late_api.wait_node("node-a", "offline")  # the Last Will
    api.wait_node("node-a", "offline")
    after = api.get("/nodes/node-a")
    assert after["first_seen"] == first_seen and after["facts"] == node["facts"]


def test_task_is_followed_to_its_end_with_full_data_events(
        mosquitto: Mosquitto, agent: AgentProcess, api: Api) -> None:
    events = Events(mosquitto.url)
    events.conn.start()
    assert events.conn.connected.wait(10)
    try:
        [task] = api.dispatch(["node-a"], {"type": "shell", "command": "echo hello"})
        assert task["state"] == "queued" and task["expires_at"]
        done = api.wait_state(task["id"], "node-a", "succeeded")
        assert done["exit_code"] == 0 and done["result"]["stdout"] == "hello\n"
        assert [u["state"] for u in done["updates"]][-1] == "succeeded"
        assert wait_until(lambda: any(e["state"] == "succeeded" for e in events.of(task["id"])))
    finally:
        events.conn.stop()
    seen = events.of(task["id"])
    assert seen[0]["state"] == "queued" and seen[0]["previous"] is None
    final = next(e for e in seen if e["state"] == "succeeded")
    assert final["topic"] == "edgerun/events/tasks/node-a"
    assert final["task"]["spec"]["command"] == "echo hello"  # full data: no second lookup
    assert final["task"]["result"]["stdout"] == "hello\n"
    states = [e["state"] for e in seen]
    assert states.count("succeeded") == 1 and {"accepted", "running"} <= set(states)


def test_node_killed_mid_task_ends_lost_never_running(agent: AgentProcess, api: Api) -> None:
    [task] = api.dispatch(["node-a"], {"type": "shell", "command": "sleep 60", "timeout": 2})
    api.wait_state(task["id"], "node-a", "running")
    agent.kill()
    lost = api.wait_state(task["id"], "node-a", {"lost", "failed", "succeeded"}, timeout=30)
    assert lost["state"] == "lost"
    assert lost["error"]["code"] == "timeout" and "node-a" in lost["error"]["message"]
    assert [u["state"] for u in lost["updates"]][-1] == "lost"


def test_task_for_an_offline_node_expires_then_the_agent_confirms(
        mosquitto: Mosquitto, agent: AgentProcess, api: Api) -> None:
    assert agent.terminate() == 0
    api.wait_node("node-a", "offline")
    expires = format_time(datetime.now(UTC) + timedelta(seconds=1.5))
    [task] = api.dispatch(["node-a"], {"type": "shell", "command": "echo late",
                                       "expires_at": expires})
    lost = api.wait_state(task["id"], "node-a", "lost")
    assert lost["error"]["code"] == "expired" and "offline" in lost["error"]["message"]
    # the node comes back: its session still holds the task, and the agent refuses it
    agent.start()
    final = api.wait_state(task["id"], "node-a", "rejected")
    assert final["error"]["code"] == "expired"


def test_tasks_other_clients_publish_are_recorded(agent: AgentProcess, api: Api,
                                                  observer: Observer) -> None:
    observer.send("node-a", shell("from-elsewhere", "echo other"))
    observer.conn.publish("edgerun/nodes/node-a/updates", b"not json", 1)
    done = api.wait_state("from-elsewhere", "node-a", "succeeded")
    assert done["source"] == "external" and done["spec"]["command"] == "echo other"
    assert done["result"]["stdout"] == "other\n"
    with urllib.request.urlopen(f"{api.url}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert 'edgerun_scheduler_tasks{state="succeeded"} 1.0' in metrics
    assert "edgerun_scheduler_bad_messages_total 1.0" in metrics
    assert 'edgerun_scheduler_nodes{state="online"} 1.0' in metrics


def test_cancel_a_running_task(agent: AgentProcess, api: Api) -> None:
    [task] = api.dispatch(["node-a"], {"type": "shell", "command": "sleep 60"})
    api.wait_state(task["id"], "node-a", "running")
    [sent] = api.post(f"/tasks/{task['id']}/cancel", {})["tasks"]
    assert sent["state"] == "running"
    done = api.wait_state(task["id"], "node-a", "canceled")
    assert done["error"]["code"] == "canceled"


def test_updates_made_while_the_scheduler_was_down_are_recorded_after_restart(
        mosquitto: Mosquitto, tmp_path: Path, observer: Observer) -> None:
    values = serve_values(mosquitto.url, tmp_path)
    app = App(values).start()
    api = Api(app.api_url)
    agent = start_agent(mosquitto.url, "node-r", tmp_path)
    try:
        api.wait_node("node-r")
        [task] = api.dispatch(["node-r"], {"type": "shell", "command": "sleep 1; echo done"})
        api.wait_state(task["id"], "node-r", "running")
        app.stop()
        observer.final(task["id"], timeout=30)  # it finished while nobody recorded
        app = App(values).start()  # same store, same persistent session
        api = Api(app.api_url)
        done = api.wait_state(task["id"], "node-r", "succeeded")
        assert done["result"]["stdout"] == "done\n"
    finally:
        app.stop()
        agent.kill()


def test_broker_restart_mid_task_the_final_update_still_arrives(
        mosquitto: Mosquitto, agent: AgentProcess, api: Api, app: App) -> None:
    [task] = api.dispatch(["node-a"], {"type": "shell", "command": "sleep 2; echo after"})
    api.wait_state(task["id"], "node-a", "running")
    mosquitto.stop()  # a restart: sessions and retained status are saved and come back
    mosquitto.start()
    done = api.wait_state(task["id"], "node-a", "succeeded", timeout=60)
    assert done["result"]["stdout"] == "after\n"
    assert app.service is not None and app.service.messenger.connected.is_set()
    api.wait_node("node-a", "online")
