"""The floor under item 2's light round trip on this machine: `python bench/floor.py [N]`.

What an agent with no cost of its own would still pay for `true` in direct mode: a
private Mosquitto (bench/common.py's config), a driver that publishes a task at QoS 1
and waits for the answer, and an echo process that answers it at QoS 1 from inside
paho's on_message callback (one thread, nothing queued; a real agent must not block in
a callback, this measurement tool may). The echo does more at each level:

  echo    publish the answer at once: two broker hops and paho on both sides
  sync    + append 150 bytes to a file and fdatasync it (the durable `accepted`)
  spawn   + posix_spawn `/bin/sh -c true` (vfork + exec) and waitpid, after the sync:
          what the agent does for a string command (edgerun/agent/shell.py)

Prints p50/p99 per level in ms. Bench item 2 runs it too (200 per level, on its own
Mosquitto while the agents idle) and reports it beside its light-load figures: what
limits item 2's p50 on the machine at hand (bench/hops.py shows the agent's own hops).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LEVELS = ("echo", "sync", "spawn")


def _client(name: str) -> Any:
    import socket

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=name)

    def nodelay(_c: Any, _u: Any, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.on_socket_open = nodelay
    return client


def echo_main(url_port: int, level: str, workdir: str) -> int:
    """The echo process: answers every message on floor/task on floor/done."""
    fd = os.open(os.path.join(workdir, f"{level}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    client = _client(f"floor-echo-{level}")
    line = b"x" * 149 + b"\n"
    env = dict(os.environ)

    def on_message(c: Any, _u: Any, msg: Any) -> None:
        if level in ("sync", "spawn"):
            os.write(fd, line)
            os.fdatasync(fd)
        if level == "spawn":
            os.waitpid(os.posix_spawn("/bin/sh", ["/bin/sh", "-c", "true"], env), 0)
        c.publish("floor/done", msg.payload, 1)

    def on_connect(c: Any, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        c.subscribe("floor/task", 1)
    client.on_message, client.on_connect = on_message, on_connect
    client.connect("127.0.0.1", url_port)
    print("ready", flush=True)
    client.loop_forever()
    return 0


def measure(port: int, level: str, tasks: int, workdir: Path) -> list[float]:
    echo = subprocess.Popen([sys.executable, __file__, "echo", str(port), level, str(workdir)],
                            stdout=subprocess.PIPE, text=True)
    assert echo.stdout is not None
    echo.stdout.readline()
    done = threading.Event()
    driver = _client(f"floor-driver-{level}")
    driver.on_message = lambda c, u, m: done.set()
    driver.on_connect = lambda c, u, f, rc, p: c.subscribe("floor/done", 1)
    driver.connect("127.0.0.1", port)
    driver.loop_start()
    time.sleep(1.5)  # both subscribed
    times = []
    try:
        for i in range(tasks + 20):
            done.clear()
            start = time.monotonic()
            driver.publish("floor/task", b"%d" % i, 1)
            if not done.wait(10):
                raise RuntimeError(f"level {level}: no answer within 10 s")
            if i >= 20:  # warm-up
                times.append((time.monotonic() - start) * 1000)
            time.sleep(0.002)  # light load: the machine idles between tasks, as in item 2
    finally:
        driver.loop_stop()
        driver.disconnect()
        echo.kill()
        echo.wait()
    return times


def floor(url: str, tasks: int, workdir: Path) -> dict[str, dict[str, float]]:
    """p50 and p99 (ms) of each level against the Mosquitto at `url`."""
    from bench.common import percentile
    workdir.mkdir(parents=True, exist_ok=True)
    port = int(url.rsplit(":", 1)[1])
    out = {}
    for level in LEVELS:
        times = measure(port, level, tasks, workdir)
        out[level] = {"p50_ms": round(percentile(times, 50), 3),
                      "p99_ms": round(percentile(times, 99), 3), "n": len(times)}
    return out


def main() -> int:
    if sys.argv[1:2] == ["echo"]:
        return echo_main(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    from bench.common import mosquitto
    tasks = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    work = Path(tempfile.mkdtemp(prefix="floor-"))
    broker = mosquitto(work / "mosquitto")
    try:
        print(f"{tasks} round trips per level, load {os.getloadavg()[0]:.1f}")
        for level, row in floor(broker.url, tasks, work).items():
            print(f"  {level:6s} p50 {row['p50_ms']:6.3f}  p99 {row['p99_ms']:6.3f} ms")
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
