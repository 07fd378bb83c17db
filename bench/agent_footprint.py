"""Agent footprint: time from exec to the retained online status, and idle RSS.

Usage: python bench/agent_footprint.py [--broker mqtt://127.0.0.1:1883] [--runs 5]
                                       [--agent-cmd "edgerun-agent"]
Prints one JSON object. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edgerun.mqtt import Inbound, MqttConnection
from edgerun.settings import parse_broker_url


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def one_run(broker: str, agent_cmd: list[str], idle_s: float) -> dict[str, float]:
    node = f"bench-{uuid.uuid4().hex[:8]}"
    online = threading.Event()

    def on_message(msg: Inbound) -> None:
        if b'"online"' in msg.payload:
            online.set()
    watcher = MqttConnection(parse_broker_url(broker, ("mqtt", "mqtts")), f"w-{node}",
                             on_message=on_message, clean_session=True,
                             subscriptions=[(f"edgerun/nodes/{node}/status", 1)])
    watcher.start()
    watcher.connected.wait(10)
    time.sleep(0.2)  # let the SUBSCRIBE reach the broker before the agent starts
    with tempfile.TemporaryDirectory() as state:
        started = time.monotonic()
        proc = subprocess.Popen([*agent_cmd, "--broker", broker, "--node", node,
                                 "--state-dir", state, "--log-level", "warning"])
        try:
            if not online.wait(30):
                raise RuntimeError("agent never came online")
            to_online = time.monotonic() - started
            time.sleep(idle_s)
            rss = rss_kib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)
    # clear the retained status this run left behind
    watcher.publish(f"edgerun/nodes/{node}/status", b"", 1, True)
    watcher.flush(5)
    watcher.stop()
    return {"exec_to_online_s": to_online, "idle_rss_mib": rss / 1024}


def baseline_rss() -> float:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    time.sleep(1)
    rss = rss_kib(proc.pid) / 1024
    proc.wait()
    return rss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--idle", type=float, default=3.0)
    parser.add_argument("--agent-cmd", default=f"{sys.executable} -m agent")
    args = parser.parse_args()
    runs = [one_run(args.broker, shlex.split(args.agent_cmd), args.idle)
            for _ in range(args.runs)]
    print(json.dumps({
        "agent_cmd": args.agent_cmd, "runs": args.runs,
        "exec_to_online_s_median": round(statistics.median(r["exec_to_online_s"] for r in runs), 3),
        "idle_rss_mib_median": round(statistics.median(r["idle_rss_mib"] for r in runs), 1),
        "python_pass_rss_mib": round(baseline_rss(), 1),
    }, indent=2))


if __name__ == "__main__":
    main()
