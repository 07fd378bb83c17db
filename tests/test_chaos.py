"""Chaos: thousands of tasks through scheduler, RabbitMQ, bridge, Mosquitto and agents
while the bridge is killed -9 three times, Mosquitto and RabbitMQ are restarted and an
agent is killed -9 and restarted.

At the end every task is in exactly one final state in the scheduler's store, no task
ran twice (each command appends its id to a file), and no update was lost: the store
agrees with each agent's own task log about every task's final state.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from edgerun.protocol import FINAL_STATES

from .bridgekit import BridgeProcess
from .brokers import Mosquitto, wait_until
from .mqttkit import AgentProcess
from .rabbit import Rabbit, rabbit_scripts
from .scheduler_kit import Api, running_app, start_agent

pytestmark = pytest.mark.skipif(rabbit_scripts() is None, reason="needs a private RabbitMQ")
NODES = [f"chaos-{i}" for i in range(1, 5)]
WAVES, PER_WAVE = 8, 250  # 2,000 tasks


def latest_states(state_dir: Path) -> dict[str, str]:
    """Each task id's latest state in an agent's own task log."""
    latest: dict[str, str] = {}
    log = state_dir / "tasks.jsonl"
    for line in log.read_text().splitlines() if log.exists() else []:
        try:
            update = json.loads(line)
        except ValueError:
            continue
        if isinstance(update, dict) and "state" in update:  # not a `delivered` mark
            latest[update["id"]] = update["state"]
    return latest


@pytest.mark.timeout(900)
def test_chaos(tmp_path: Path) -> None:
    ran_log = tmp_path / "ran.log"
    rabbit = Rabbit(tmp_path / "rabbit").start()
    mosquitto = Mosquitto(tmp_path / "mosquitto").start()
    bridge = BridgeProcess(mosquitto.url, rabbit.url, tmp_path / "bridge",
                           client_id="chaos-bridge")
    agents: dict[str, AgentProcess] = {}
    try:
        bridge.start().wait_ready()
        with running_app(rabbit.url, tmp_path, grace=3600.0) as app:
            api = Api(app.api_url)
            assert app.service is not None
            service = app.service
            for node in NODES:
                # a wave sent while the bridge is down arrives at once: room for all of it
                agents[node] = start_agent(mosquitto.url, node, tmp_path, "--parallel", "2",
                                           "--queue-size", "1000")
                api.wait_node(node)

            sent: list[tuple[str, str]] = []

            def wave(number: int) -> None:
                assert wait_until(service.messenger.connected.is_set, 120), "scheduler offline"
                for i in range(PER_WAVE):
                    node = NODES[i % len(NODES)]
                    task_id = f"w{number}-{i}"
                    service.dispatch([node], False, {
                        "id": task_id, "type": "shell", "timeout": 3000,
                        "command": f"echo {task_id} >> {ran_log}; sleep 0.02"})
                    sent.append((node, task_id))

            def kill_bridge() -> None:
                assert bridge.proc is not None
                bridge.proc.kill()
                bridge.proc.wait()

            def restart_bridge() -> None:
                bridge.start()

            def restart_agent() -> None:
                # kill it with a task in hand, not between tasks
                assert wait_until(lambda: service.store.tasks(node="chaos-2", state="running"),
                                  60, 0.01)
                agents["chaos-2"].kill()
                agents["chaos-2"].start()

            def restart_mosquitto() -> None:
                mosquitto.stop()
                mosquitto.start()

            # (before the wave, after the wave): the faults, spread over the run
            plan: list[tuple[Callable[[], None] | None, Callable[[], None] | None]] = [
                (None, None),
                (kill_bridge, restart_bridge),          # a whole wave sent with no bridge
                (None, restart_mosquitto),
                (None, lambda: (kill_bridge(), restart_bridge())),
                (None, rabbit.restart),                  # kill -9 and start again
                (None, restart_agent),                   # kill -9 mid-task and start again
                (None, lambda: (kill_bridge(), restart_bridge())),
                (None, None),
            ]
            for number, (before, after) in enumerate(plan):
                if before:
                    before()
                wave(number)
                if after:
                    after()

            def all_final() -> bool:
                return sum(n for s, n in service.store.count_by_state().items()
                           if s in FINAL_STATES) >= len(sent)
            done = wait_until(all_final, 600, 0.5)
            counts = service.store.count_by_state()
            assert done, f"not every task ended: {counts}"

            tasks = {(t.node, t.id): t for t in service.store.tasks(limit=1_000_000)}
            ran = Counter(ran_log.read_text().split())
            agent_view: dict[str, dict[str, str]] = {
                node: latest_states(tmp_path / f"agent-{node}" / "state") for node in NODES}
            duplicates = sum(a.log().count("was seen before") for a in agents.values())
            interrupted = [t for t in tasks.values() if t.state == "failed"]
            print(f"\nchaos: {len(sent)} tasks; final states {dict(counts)}; "
                  f"ran once {sum(1 for n in ran.values() if n == 1)}, "
                  f"ran twice or more {sum(1 for n in ran.values() if n > 1)}, "
                  f"never ran {len(sent) - len(ran)}; duplicate deliveries the agents "
                  f"absorbed {duplicates}; interrupted by the agent kill {len(interrupted)}")

            assert len(tasks) == len(sent) == WAVES * PER_WAVE
            odd = [t for t in tasks.values() if t.state not in ("succeeded", "failed")]
            assert not odd, odd[:3]
            assert all(n == 1 for n in ran.values()), "a task ran twice"
            for (node, task_id), task in tasks.items():
                if task.state == "succeeded":
                    assert ran[task_id] == 1
                else:  # only the tasks the killed agent had in hand
                    assert node == "chaos-2" and task.error is not None, task
                    assert task.error.code == "internal", task
                # no update lost: the store ends where the agent ended
                assert agent_view[node].get(task_id) == task.state, (node, task_id)
    finally:
        for agent in agents.values():
            if agent.alive():
                agent.kill()
        if bridge.proc is not None and bridge.proc.poll() is None:
            bridge.proc.kill()
        mosquitto.stop()
        rabbit.stop()
