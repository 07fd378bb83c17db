"""Items 5 and 7: the agent's footprint, and the small mode against the full stack.

Item 5: exec -> retained online status and idle RSS, counting the RSS of the
agent's whole process tree: the frozen binary is staticx's launcher whose
child process is the agent, so the RSS of the exec'd pid alone would leave the
agent out. Both frozen agents are measured: `edgerun-agent` (compressed: at every
start staticx decodes glibc from xz and images/binary/unpack.c inflates the rest
from zlib; OpenSSL waits in an xz pack until first use) and the discovery image's
PyInstaller folder, run in place (a copy of images/out/edgerun-agent.root's, on
the host's glibc). RSS while running is the peak of the tree during a `sleep 1`
task, less the `sleep` process itself. The image's boot against its floor is
bench/boot.py.

Item 7 starts `edgerun serve --embedded-broker` and one agent in direct mode,
then RabbitMQ + Mosquitto + bridge + `edgerun serve --broker amqp://` + one
agent, and sums the RSS of every process of each, idle and under load (tasks
for `true` posted to the HTTP API at a steady rate).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench.boot import image_boot
from bench.common import ROOT, median, mosquitto, rss_mib, tree_rss_mib
from edgerun.cli.client import Client
from edgerun.mqtt import Inbound, MqttConnection
from edgerun.protocol import ShellTask, encode
from edgerun.settings import parse_broker_url
from tests.bridgekit import BridgeProcess
from tests.brokers import free_port, wait_until
from tests.rabbit import Rabbit

BINARY = ROOT / "images" / "out" / "edgerun-agent"
IMAGE_FOLDER = ROOT / "images" / "out" / "edgerun-agent.root" / "usr" / "lib" / "edgerun-agent"
IMAGE_NAME = "the image's folder, run in place"


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def agent_run(broker: str, cmd: list[str], idle_s: float) -> dict[str, float]:
    node = f"fp-{uuid.uuid4().hex[:8]}"
    seen: dict[str, threading.Event] = {"online": threading.Event(),
                                        "running": threading.Event(),
                                        "succeeded": threading.Event()}

    def on_message(msg: Inbound) -> None:
        for state, event in seen.items():
            if f'"{state}"'.encode() in msg.payload:
                event.set()

    watcher = MqttConnection(parse_broker_url(broker, ("mqtt",)), f"w-{node}",
                             on_message=on_message, clean_session=True,
                             subscriptions=[(f"edgerun/nodes/{node}/status", 1),
                                            (f"edgerun/nodes/{node}/updates", 1)])
    watcher.start()
    assert watcher.connected.wait(10)
    time.sleep(0.2)
    with tempfile.TemporaryDirectory() as state:
        started = time.monotonic()
        proc = subprocess.Popen([*cmd, "--broker", broker, "--node", node, "--state-dir", state,
                                 "--log-level", "warning"])
        try:
            if not seen["online"].wait(30):
                raise RuntimeError(f"{cmd[0]} never came online")
            to_online = time.monotonic() - started
            time.sleep(idle_s)
            idle = tree_rss_mib(proc.pid)
            watcher.publish(f"edgerun/nodes/{node}/tasks",
                            encode(ShellTask(id="fp-task", command="sleep 1")), 1)
            peak = 0.0
            deadline = time.monotonic() + 10
            while not seen["succeeded"].is_set() and time.monotonic() < deadline:
                if seen["running"].is_set():
                    total = tree_rss_mib(proc.pid)
                    sleeps = [c for p in [proc.pid, *_children(proc.pid)] for c in _children(p)
                              if Path(f"/proc/{c}/comm").exists()
                              and "sleep" in Path(f"/proc/{c}/comm").read_text()]
                    peak = max(peak, total - sum(rss_mib(s) for s in sleeps))
                time.sleep(0.05)
        finally:
            proc.terminate()
            proc.wait(30)
    watcher.publish(f"edgerun/nodes/{node}/status", b"", 1, True)
    watcher.flush(5)
    watcher.stop()
    return {"exec_to_online_s": to_online, "idle_rss_mib": idle, "task_rss_mib": peak}


def python_pass() -> dict[str, float]:
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    elapsed = time.monotonic() - started
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    time.sleep(1)
    rss = rss_mib(proc.pid)
    proc.wait()
    return {"exec_s": elapsed, "rss_mib": rss}


def _dir_mib(paths: list[Path]) -> float:
    total = 0
    for path in paths:
        for root, _dirs, files in os.walk(path):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files
                         if not f.endswith(".pyc"))
    return total / 2**20


def item5(work: Path, runs: int) -> dict[str, Any]:
    broker = mosquitto(work / "item5" / "mosquitto")
    out: dict[str, Any] = {"runs": runs}
    import paho
    site = Path(paho.__file__).parent.parent
    installed = shutil.which("edgerun-agent", path=str(Path(sys.executable).parent))
    folder = work / "item5" / "edgerun-agent"  # a copy: the build's stays as built
    if os.access(IMAGE_FOLDER / "edgerun-agent", os.X_OK):
        shutil.copytree(IMAGE_FOLDER, folder, symlinks=True)
    variants: dict[str, list[str] | None] = {
        "frozen binary": [str(BINARY)] if os.access(BINARY, os.X_OK) else None,
        IMAGE_NAME: [str(folder / "edgerun-agent")] if folder.exists() else None,
        "installed (python -m edgerun.agent)": ([installed] if installed
                                        else [sys.executable, "-m", "edgerun.agent"]),
    }
    try:
        for name, cmd in variants.items():
            if cmd is None:
                out[name] = {"built": False}
                continue
            results = [agent_run(broker.url, cmd, 2.0) for _ in range(runs)]
            entry: dict[str, Any] = {"built": True, "cmd": " ".join(cmd), "runs": results}
            for key in ("exec_to_online_s", "idle_rss_mib", "task_rss_mib"):
                entry[key] = median([r[key] for r in results])
            if name == IMAGE_NAME:
                entry["size_mib"] = _dir_mib([folder])
            elif name.startswith("frozen binary"):
                entry["size_mib"] = Path(cmd[0]).stat().st_size / 2**20
            else:
                entry["size_mib"] = _dir_mib([ROOT / "edgerun",
                                              site / "paho", site / "requests",
                                              site / "urllib3", site / "idna",
                                              site / "charset_normalizer", site / "certifi"])
                entry["size_note"] = ("agent + edgerun + paho + requests and its dependencies, "
                                      "without .pyc; the Python interpreter not counted")
            out[name] = entry
            print(f"  item 5: {name}: online {entry['exec_to_online_s']:.2f} s, idle "
                  f"{entry['idle_rss_mib']:.1f} MiB, running {entry['task_rss_mib']:.1f} MiB, "
                  f"size {entry['size_mib']:.1f} MiB", flush=True)
        out["python3 -c pass"] = {k: median([python_pass()[k] for _ in range(runs)])
                                  for k in ("exec_s", "rss_mib")}
        out["image boot"] = image_boot(broker.url, work / "item5" / "boot", runs)
    finally:
        broker.stop()
    return out


# --- item 7 --------------------------------------------------------------------------
def _serve(args: list[str], work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EDGERUN_CONFIG", None)
    log = open(work / "serve.log", "ab")  # noqa: SIM115 - the process keeps it
    proc = subprocess.Popen([sys.executable, "-m", "edgerun.scheduler", "serve", "--db",
                             str(work / "sched.db"), "--listen", f"127.0.0.1:{port}",
                             "--log-level", "warning", *args], stdout=log, stderr=log, env=env,
                            cwd=work)
    log.close()
    return proc, f"http://127.0.0.1:{port}"


def _agent(broker: str, node: str, work: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "edgerun.agent", "--broker", broker,
                             "--node", node,
                             "--state-dir", str(work / "agent"), "--log-level", "warning"],
                            env=env, cwd=ROOT)


def _load(api: str, node: str, pids: list[int], rate: float, seconds: float) -> dict[str, Any]:
    client = Client(api)
    peak, ids = 0.0, []
    started = time.monotonic()
    i = 0
    while time.monotonic() - started < seconds:
        pause = started + i / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        task_id = f"load-{uuid.uuid4().hex[:12]}"
        client.post("/tasks", {"targets": [node],
                               "task": {"type": "shell", "command": "true", "id": task_id}})
        ids.append(task_id)
        if i % 10 == 0:
            peak = max(peak, sum(tree_rss_mib(p) for p in pids))
        i += 1

    def finished() -> bool:
        done = client.get("/tasks", node=node, state="succeeded", limit=len(ids) + 10)["tasks"]
        return len(done) >= len(ids)
    ok = wait_until(finished, 60, 0.5)
    peak = max(peak, sum(tree_rss_mib(p) for p in pids))
    return {"tasks": len(ids), "rate": rate, "all_succeeded": ok, "peak_rss_mib": peak}


def _wait_node(api: str, node: str) -> None:
    client = Client(api, timeout=5)

    def known() -> bool:
        try:
            return any(n.get("node") == node and n.get("state") == "online"
                       for n in client.get("/nodes")["nodes"])
        except Exception:
            return False
    if not wait_until(known, 60, 0.2):
        raise RuntimeError(f"node {node} never showed up online at {api}")


def item7(work: Path, rate: float, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {"load": f"{rate:.0f} tasks/s of `true` for {seconds:.0f} s via HTTP"}
    small = work / "item7-small"
    small.mkdir(parents=True)
    mqtt_port = free_port()
    serve, api = _serve(["--embedded-broker", f"127.0.0.1:{mqtt_port}"], small)
    agent = None
    try:
        agent = _agent(f"mqtt://127.0.0.1:{mqtt_port}", "small-1", small)
        _wait_node(api, "small-1")
        time.sleep(3)
        pids = {"scheduler + embedded broker": serve.pid, "agent": agent.pid}
        idle = {k: tree_rss_mib(p) for k, p in pids.items()}
        load = _load(api, "small-1", list(pids.values()), rate, seconds)
        out["small"] = {"idle": idle, "idle_total_mib": sum(idle.values()), **load}
    finally:
        for proc in (agent, serve):
            if proc is not None:
                proc.terminate()
                proc.wait(30)
    print(f"  item 7: small mode idle {out['small']['idle_total_mib']:.0f} MiB, load peak "
          f"{out['small']['peak_rss_mib']:.0f} MiB", flush=True)
    full = work / "item7-full"
    rabbit = Rabbit(full / "rabbit").start()
    broker = mosquitto(full / "mosquitto")
    bridge = BridgeProcess(broker.url, rabbit.url, full / "bridge").start()
    serve, api = _serve(["--broker", rabbit.url, "--queue", "bench.item7"], full)
    agent = None
    try:
        bridge.wait_ready()
        agent = _agent(broker.url, "full-1", full)
        _wait_node(api, "full-1")
        time.sleep(3)
        assert rabbit.proc and broker.proc and bridge.proc
        pids = {"rabbitmq": rabbit.proc.pid, "mosquitto": broker.proc.pid,
                "bridge": bridge.proc.pid, "scheduler": serve.pid, "agent": agent.pid}
        idle = {k: tree_rss_mib(p) for k, p in pids.items()}
        load = _load(api, "full-1", list(pids.values()), rate, seconds)
        out["full"] = {"idle": idle, "idle_total_mib": sum(idle.values()), **load}
    finally:
        for proc in (agent, serve):
            if proc is not None:
                proc.terminate()
                proc.wait(30)
        bridge.terminate()
        broker.stop()
        rabbit.stop()
    out["idle_ratio"] = out["full"]["idle_total_mib"] / out["small"]["idle_total_mib"]
    out["load_ratio"] = out["full"]["peak_rss_mib"] / out["small"]["peak_rss_mib"]
    print(f"  item 7: full stack idle {out['full']['idle_total_mib']:.0f} MiB, load peak "
          f"{out['full']['peak_rss_mib']:.0f} MiB", flush=True)
    from bench.hostile_memory import run as hostile_run  # issue 23: idle, burst, after
    out["hostile"] = hostile_run(output_mb=50, readers=10, bursts=2)
    print(f"  item 7: small mode after a hostile burst "
          f"+{out['hostile']['after2_minus_idle_mib']:.1f} MiB over idle", flush=True)
    return out
