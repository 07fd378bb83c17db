"""The contract's two optional fields, end to end: `"of": "cancel"` and `output_dropped`.

A refused cancel is answered with a `rejected` update that carries `"of":
"cancel"`; the agent does not take it as the task's latest update, and the
scheduler does not apply it to the task. `output_dropped` on a final shell
update is kept by the scheduler with the task's result.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from edgerun.cli.render import show_task
from edgerun.protocol import format_time
from edgerun.signing import Signer, generate_keypair

from .brokers import Mosquitto, wait_until
from .mqttkit import AgentProcess, Observer, shell
from .scheduler_kit import Api, running_app


def test_a_refused_cancel_is_marked_and_leaves_the_task_alone(
        mosquitto: Mosquitto, observer: Observer, tmp_path: Path) -> None:
    private, public = generate_keypair()
    signer = Signer(private)
    agent = AgentProcess(mosquitto.url, "node-k", tmp_path / "a", "--public-key", public).start()
    agent.wait_online(observer)
    observer.send("node-k", signer.sign(shell("k1", "sleep 1; echo done")))
    observer.wait("update", id="k1", state="running")
    observer.send("node-k", {"v": 1, "kind": "cancel", "id": "k1"})  # not signed
    refusal = observer.wait("update", id="k1", state="rejected")[0]
    assert refusal["of"] == "cancel" and refusal["error"]["code"] == "bad_signature"
    assert wait_until(lambda: any(u["state"] == "succeeded" for u in observer.updates("k1")))
    final = [u for u in observer.updates("k1") if u["state"] == "succeeded"]
    assert final[0]["stdout"] == "done\n"
    # the task's latest update is its real one, not the refusal of the cancel
    observer.send("node-k", signer.sign(shell("k1", "sleep 1; echo done")))
    assert wait_until(lambda: len([u for u in observer.updates("k1")
                                   if u["state"] == "succeeded"]) == 2)
    assert "of" not in observer.updates("k1")[-1]
    assert agent.terminate() == 0


def _agent_says(observer: Observer, node: str, **update: object) -> None:
    body = {"v": 1, "kind": "update", "node": node, "at": format_time(), **update}
    observer.conn.publish(observer.topics.updates(node), json.dumps(body).encode(), 1)


def test_the_scheduler_ignores_a_refused_cancel_and_keeps_output_dropped(
        mosquitto: Mosquitto, observer: Observer, tmp_path: Path) -> None:
    node = "node-fake"  # this test plays the agent with raw updates on the real broker
    with running_app(mosquitto.url, tmp_path) as app:
        api = Api(app.api_url)
        status = {"v": 1, "kind": "status", "node": node, "state": "online", "at": format_time(),
                  "agent": "fake", "facts": {}, "running": []}
        observer.conn.publish(observer.topics.status(node), json.dumps(status).encode(), 1, True)
        api.wait_node(node)
        task_id = api.dispatch([node], {"type": "shell", "command": "yes"})[0]["id"]
        api.wait_state(task_id, node, "dispatched")
        # refused before the agent accepted the task: the state machine would allow
        # `rejected` here, so only `of` keeps the task from being ended by it
        _agent_says(observer, node, id=task_id, state="rejected", of="cancel",
                    error={"code": "bad_signature", "message": "the cancel is not signed"})
        _agent_says(observer, node, id="probe", state="rejected",
                    error={"code": "bad_message", "message": "ordering probe"})
        api.wait_state("probe", node, "rejected")  # updates are handled in order
        assert api.task(task_id, node)["state"] == "dispatched"
        _agent_says(observer, node, id=task_id, state="accepted")
        _agent_says(observer, node, id=task_id, state="running")
        api.wait_state(task_id, node, "running")
        _agent_says(observer, node, id=task_id, state="succeeded", exit_code=0, stdout="y\n",
                    stderr="", truncated=True, duration_s=1.5, output_dropped=123456)
        task = api.wait_state(task_id, node, "succeeded")
        assert task["result"]["output_dropped"] == 123456
        assert task["error"] is None
        shown = io.StringIO()
        show_task(task, shown)
        assert "123456 bytes of live output were not sent" in shown.getvalue()


def test_cancel_if_queued_withdraws_a_queued_task_and_never_kills_a_running_one(
        mosquitto: Mosquitto, observer: Observer, tmp_path: Path) -> None:
    agent = AgentProcess(mosquitto.url, "node-w", tmp_path / "w").start()
    agent.wait_online(observer)
    observer.send("node-w", shell("w-run", "sleep 1; echo finished"))
    observer.wait("update", id="w-run", state="running")
    observer.send("node-w", shell("w-queued", "echo never"))
    observer.wait("update", id="w-queued", state="accepted")
    for task_id in ("w-run", "w-queued", "w-unknown"):
        observer.send("node-w", {"v": 1, "kind": "cancel", "id": task_id, "if_queued": True})
    assert wait_until(lambda: any(u["state"] == "canceled"
                                  for u in observer.updates("w-queued")))
    queued = next(u for u in observer.updates("w-queued") if u["state"] == "canceled")
    assert queued["error"]["message"] == "canceled before it started"
    assert wait_until(lambda: any(u["state"] in ("succeeded", "canceled", "failed")
                                  for u in observer.updates("w-run")))
    final = observer.updates("w-run")[-1]
    assert final["state"] == "succeeded" and final["stdout"] == "finished\n"
    assert observer.updates("w-unknown") == []
    # `if_queued` that is not a boolean is refused, marked as the cancel's
    observer.send("node-w", shell("w-two", "sleep 1"))
    observer.wait("update", id="w-two", state="running")
    observer.send("node-w", {"v": 1, "kind": "cancel", "id": "w-two", "if_queued": "yes"})
    refusal = observer.wait("update", id="w-two", state="rejected")[0]
    assert refusal["of"] == "cancel" and "if_queued" in refusal["error"]["message"]
    assert wait_until(lambda: observer.updates("w-two")[-1]["state"] == "succeeded")
    assert agent.terminate() == 0
