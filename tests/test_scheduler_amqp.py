"""AMQP mode end to end: scheduler -> RabbitMQ -> bridge -> Mosquitto -> real agent, and back.

A private RabbitMQ (tests/rabbit.py), a private Mosquitto, the bridge as a real
process, the scheduler's AMQP messenger, one real agent. Exchange and queue
names are unique to this module, so a shared broker would do as well.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pytest

from edgerun.scheduler.app import App

from .bridgekit import BridgeProcess
from .brokers import Mosquitto, wait_until
from .mqttkit import AgentProcess
from .rabbit import Rabbit
from .scheduler_kit import Api, cli, running_app, start_agent

UID = uuid.uuid4().hex[:6]
TASKS, EVENTS, AUDIT = f"t{UID}.tasks", f"t{UID}.events", f"t{UID}.audit"


@dataclass
class Stack:
    rabbit: Rabbit
    mosquitto: Mosquitto
    bridge: BridgeProcess
    app: App
    api: Api
    agent: AgentProcess


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, rabbit: Rabbit) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("amqp")
    mosquitto = Mosquitto(tmp / "mosquitto").start()
    bridge = BridgeProcess(mosquitto.url, rabbit.url, tmp / "bridge", "--tasks-exchange", TASKS,
                           "--events-exchange", EVENTS, "--tasks-queue", f"t{UID}.bridge")
    agent: AgentProcess | None = None
    try:
        bridge.start().wait_ready()
        with running_app(rabbit.url, tmp, tasks_exchange=TASKS, events_exchange=EVENTS,
                         audit_exchange=AUDIT) as app:
            api = Api(app.api_url)
            agent = start_agent(mosquitto.url, "amqp-1", tmp)
            api.wait_node("amqp-1")
            yield Stack(rabbit, mosquitto, bridge, app, api, agent)
    finally:
        if agent is not None and agent.alive():
            agent.kill()
        if bridge.proc is not None and bridge.proc.poll() is None:
            bridge.proc.terminate()
            bridge.proc.wait(30)
        mosquitto.stop()


class Audit:
    """A pika consumer of the audit exchange on a thread of its own."""

    def __init__(self, url: str, key: str) -> None:
        self.events: list[dict[str, Any]] = []
        self.conn = pika.BlockingConnection(pika.URLParameters(url))
        self.ch = self.conn.channel()
        self.ch.exchange_declare(AUDIT, "topic", durable=True)
        self.queue = self.ch.queue_declare("", exclusive=True).method.queue
        self.ch.queue_bind(self.queue, AUDIT, key)
        self.ch.basic_consume(self.queue, self._on, auto_ack=True)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _on(self, _ch: Any, method: Any, props: Any, body: bytes) -> None:
        self.events.append({"key": method.routing_key, "type": props.content_type,
                            **json.loads(body)})

    def _run(self) -> None:
        while not self._stop.is_set():
            self.conn.process_data_events(time_limit=0.2)
        self.conn.close()

    def close(self) -> None:
        self._stop.set()
        self.thread.join(10)


def test_registry_through_the_bridge(stack: Stack) -> None:
    node = stack.api.get("/nodes/amqp-1")
    assert node["state"] == "online" and node["facts"]["hostname"]
    assert stack.api.get("/health")["messenger"] == "amqp"


def test_run_through_the_bridge_with_live_output_and_audit_events(stack: Stack) -> None:
    audit = Audit(stack.rabbit.url, "task.amqp-1.#")
    try:
        result = cli(stack.api.url, "run", "amqp-1", "--", "sh", "-c",
                     "echo over amqp; exit 6")
        assert result.code == 6 and "amqp-1 | over amqp" in result.out
        assert wait_until(lambda: any(e["state"] == "failed" for e in audit.events), 15)
    finally:
        audit.close()
    final = next(e for e in audit.events if e["state"] == "failed")
    assert final["key"] == "task.amqp-1.failed" and final["type"] == "application/json"
    assert final["task"]["exit_code"] == 6 and final["task"]["result"]["stdout"] == "over amqp\n"


def test_tasks_other_amqp_clients_publish_are_recorded(stack: Stack) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(stack.rabbit.url))
    try:
        ch = conn.channel()
        task = {"v": 1, "kind": "task", "id": "by-workflow-engine", "type": "shell",
                "command": "echo from the engine"}
        ch.basic_publish(TASKS, "node.amqp-1", json.dumps(task).encode(),
                         pika.BasicProperties(content_type="application/json", delivery_mode=2))
    finally:
        conn.close()
    done = stack.api.wait_state("by-workflow-engine", "amqp-1", "succeeded")
    assert done["source"] == "external" and done["result"]["stdout"] == "from the engine\n"


def test_rabbitmq_restart_then_tasks_flow_again(stack: Stack) -> None:
    stack.rabbit.restart()
    assert stack.app.service is not None
    messenger = stack.app.service.messenger
    assert wait_until(messenger.connected.is_set, 60), messenger.last_error
    stack.bridge.wait_ready(60)
    [task] = stack.api.dispatch(["amqp-1"], {"type": "shell", "command": "echo again"})
    done = stack.api.wait_state(task["id"], "amqp-1", "succeeded", timeout=60)
    assert done["result"]["stdout"] == "again\n"


def test_agent_killed_mid_task_is_lost_through_the_bridge(stack: Stack) -> None:
    [task] = stack.api.dispatch(["amqp-1"], {"type": "shell", "command": "sleep 60",
                                             "timeout": 2})
    stack.api.wait_state(task["id"], "amqp-1", "running")
    stack.agent.kill()
    stack.api.wait_node("amqp-1", "offline")
    lost = stack.api.wait_state(task["id"], "amqp-1", {"lost", "failed", "succeeded"})
    assert lost["state"] == "lost" and lost["error"]["code"] == "timeout"


def test_scheduler_names_an_unreachable_rabbitmq(tmp_path: Path) -> None:
    from .brokers import free_port
    url = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    result = cli("http://unused", "serve", "--broker", url, "--connect-timeout", "2",
                 "--db", str(tmp_path / "s.db"), "--listen", "127.0.0.1:0",
                 "--log-level", "error")
    assert result.code == 4
    assert "cannot reach the broker amqp://guest:***@127.0.0.1" in result.err
