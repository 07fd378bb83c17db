"""A rollout withdraws, never kills (issue 23): on abort, a target the scheduler last
heard `accepted` gets `cancel` with `"if_queued": true`, so a node whose command had
started meanwhile (its `running` still on the way) finishes it and the target counts.
The node here is played by the test on the real broker, so the scheduler's view can
lag the node's as a slow uplink makes it; the agent's side of `if_queued` is
tests/test_agent_contract.py's."""

from __future__ import annotations

import json
import queue
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgerun.protocol import Topics, format_time

from .apikit import FakeFleet, call, wait_for
from .brokers import Mosquitto
from .scheduler_kit import running_app


def test_abort_sends_cancel_if_queued_and_a_started_target_finishes_and_counts(
        tmp_path: Path) -> None:
    mosquitto = Mosquitto(tmp_path / "mosquitto").start()
    fleet = FakeFleet(mosquitto.url)
    heard: queue.Queue[dict[str, Any]] = queue.Queue()
    node = "slow-uplink"
    host, port = mosquitto.url.removeprefix("mqtt://").rsplit(":", 1)
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="node-inbox")
    sub.on_message = lambda _c, _u, msg: heard.put(json.loads(msg.payload))
    sub.connect(host, int(port))
    sub.subscribe(Topics().tasks(node), qos=1)
    sub.loop_start()

    def next_message(kind: str) -> dict[str, Any]:
        while True:
            message = heard.get(timeout=30)
            if message.get("kind") == kind:
                return message
    try:
        with running_app(mosquitto.url, tmp_path) as app:
            assert app.api is not None and app.admin_token is not None
            port_, token = app.api.port, app.admin_token
            fleet.online([node, "later"])
            wait_for(lambda: call(port_, "GET", "/v1/nodes", token).body["total"] == 2)
            made = call(port_, "POST", "/v1/rollouts", token, {
                "targets": [node, "later"], "batch": 1,
                "task": {"type": "shell", "command": "flash-firmware"}})
            assert made.status == 201, made.body
            rollout, task_id = made.body["id"], made.body["task_id"]
            first = next_message("task")
            assert first["id"] == task_id
            # the node accepted and has started; its `running` has not arrived yet
            fleet.client.publish(Topics().updates(node), json.dumps({
                "v": 1, "kind": "update", "id": task_id, "node": node, "state": "accepted",
                "at": format_time()}), qos=1
            ).wait_for_publish(30)
            wait_for(lambda: call(port_, "GET", f"/v1/tasks/{task_id}?node={node}",
                                  token).body["tasks"][0]["state"] == "accepted")
            aborted = call(port_, "POST", f"/v1/rollouts/{rollout}/abort", token, {})
            assert aborted.status == 200, aborted.body
            cancel = next_message("cancel")
            assert cancel == {"v": 1, "kind": "cancel", "id": task_id, "if_queued": True}
            fleet.finish(node, task_id)  # running, then succeeded: it was not killed
            shown: dict[str, Any] = {}

            def settled() -> bool:
                shown.update(call(port_, "GET", f"/v1/rollouts/{rollout}", token).body)
                return bool(shown["counts"]["active"] == 0)
            wait_for(settled)
            states = {t["node"]: t for t in shown["targets"]}
            assert shown["state"] == "aborted"
            assert states[node]["state"] == "succeeded", states
            assert shown["counts"]["succeeded"] == 1
            later = call(port_, "GET", f"/v1/tasks/{task_id}?node=later", token).body
            assert later["tasks"][0]["error"]["code"] == "rollout_aborted"
    finally:
        sub.loop_stop()
        sub.disconnect()
        fleet.close()
        mosquitto.stop()
