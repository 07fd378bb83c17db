"""Output floods: the agent's memory stays bounded and the final update always arrives.

A command writes hundreds of megabytes as fast as it can while the broker is
stopped (SIGSTOP) for seconds in the middle: the agent must not queue the flood
in memory, must count what it dropped in `output_dropped`, and must deliver
the final update once the broker runs again.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from .brokers import Mosquitto
from .mqttkit import AgentProcess, Observer, shell

BUDGET_MIB = 32
FLOOD = 200_000_000


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_flood_with_a_stalled_broker_stays_bounded_and_reports_the_drop(
        mosquitto: Mosquitto, observer: Observer, tmp_path: Path) -> None:
    agent = AgentProcess(mosquitto.url, "node-f", tmp_path / "a").start()
    agent.wait_online(observer)
    assert agent.proc is not None and mosquitto.proc is not None
    observer.send("node-f", shell("warm", "echo warm"))
    observer.final("warm")
    idle = rss_mib(agent.proc.pid)
    observer.send("node-f", shell("flood", f"yes | head -c {FLOOD}; echo END", timeout=600))
    peak, paused_at, resumed = idle, None, False
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            peak = max(peak, rss_mib(agent.proc.pid))
            running = "running" in observer.states("flood")
            if running and paused_at is None:
                os.kill(mosquitto.proc.pid, signal.SIGSTOP)
                paused_at = time.monotonic()
            if paused_at is not None and not resumed and time.monotonic() - paused_at > 4:
                os.kill(mosquitto.proc.pid, signal.SIGCONT)
                resumed = True
            if resumed and any(u["state"] not in ("accepted", "running")
                               for u in observer.updates("flood")):
                break
            time.sleep(0.02)
    finally:
        os.kill(mosquitto.proc.pid, signal.SIGCONT)
    final = observer.final("flood", timeout=60)
    assert final["state"] == "succeeded", final
    assert final["stdout"].endswith("y\nEND\n") and final["truncated"] is True
    assert 0 < final["output_dropped"] <= FLOOD, final
    assert peak - idle <= BUDGET_MIB, f"agent RSS grew from {idle:.1f} to {peak:.1f} MiB"
    assert agent.terminate() == 0


def test_flood_with_a_running_broker_delivers_the_final_update(
        mosquitto: Mosquitto, observer: Observer, tmp_path: Path) -> None:
    agent = AgentProcess(mosquitto.url, "node-g", tmp_path / "a").start()
    agent.wait_online(observer)
    assert agent.proc is not None
    idle = rss_mib(agent.proc.pid)
    peak = idle
    for run in range(3):
        task_id = f"yes-{run}"
        observer.send("node-g", shell(task_id, f"yes | head -c {FLOOD // 2}; echo END",
                                      timeout=600))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not any(
                u["state"] not in ("accepted", "running") for u in observer.updates(task_id)):
            peak = max(peak, rss_mib(agent.proc.pid))
            time.sleep(0.02)
        final = observer.final(task_id, timeout=60)
        assert final["state"] == "succeeded" and final["stdout"].endswith("END\n"), final
    assert peak - idle <= BUDGET_MIB, f"agent RSS grew from {idle:.1f} to {peak:.1f} MiB"
    assert agent.terminate() == 0
