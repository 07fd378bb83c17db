"""Issue 23, item 11: the small mode's memory idle, during a hostile burst, and after it.

Starts `edgerun serve --embedded-broker` and one agent (the small mode), warms the
API up with one request of each kind, and samples the service's RSS idle. The burst:
ten SSE readers that never read, subscribed to live output while one task prints
OUTPUT_MB of output; and a few hundred hostile requests (10,000-level nesting, 1 MiB
bodies, lone surrogates, NUL, 1e999, 30-digit cursors). Then the readers go away,
and the RSS is sampled again once it has settled (after the API's heap trim). Each
burst is repeated to tell one-time growth from a leak. Prints one JSON line.

    .venv/bin/python -m bench.hostile_memory [--output-mb 50] [--readers 10]
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import rss_mib
from bench.footprint import _agent, _serve, _wait_node
from edgerun.cli.client import Client
from edgerun.scheduler.api.trim import TRIM_EVERY_S
from tests.brokers import free_port, wait_until


def settle(pid: int, seconds: float = 3.0) -> float:
    """The median RSS over `seconds`, sampled every 0.1 s, once the API has had its
    chance to give freed heap back (api/trim.py, every TRIM_EVERY_S after requests)."""
    time.sleep(TRIM_EVERY_S + 1.0)
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        samples.append(rss_mib(pid))
        time.sleep(0.1)
    return statistics.median(samples)


def stuck_reader(port: int, token: str) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /v1/events?channel=output HTTP/1.1\r\nHost: x\r\n"
                 f"Authorization: Bearer {token}\r\n\r\n".encode())
    return sock  # and never read


def hostile(port: int, token: str) -> int:
    bodies = [b"[" * 10_000 + b"]" * 10_000, b'{"task": {"command": "\\ud800"}}',
              b"x" * (1024 * 1024), b'{"a": 1e999}', b'{"targets": ["a\\u0000"]}']
    sent = 0
    for _ in range(40):
        for body in bodies:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                conn.request("POST", "/v1/tasks", body=body,
                             headers={"Authorization": f"Bearer {token}",
                                      "Content-Type": "application/json"})
                conn.getresponse().read()
            except OSError:
                pass
            finally:
                conn.close()
            sent += 1
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/v1/tasks?cursor=" + "9" * 30,
                     headers={"Authorization": f"Bearer {token}"})
        conn.getresponse().read()
        conn.close()
        sent += 1
    return sent


def burst(client: Client, pid: int, port: int, token: str, readers: int, output_mb: int,
          n: int) -> tuple[float, int]:
    """Stuck readers during a flood of output, and hostile requests; (peak RSS, requests)."""
    socks = [stuck_reader(port, token) for _ in range(readers)]
    task_id = f"flood-{n}"
    client.post("/tasks", {"targets": ["mem-1"], "task": {
        "type": "shell", "id": task_id, "timeout": 600,
        "command": f"head -c {output_mb * 1_000_000} /dev/zero | tr '\\0' x"}})
    peak = rss_mib(pid)
    requests = hostile(port, token)

    def flood_done() -> bool:
        nonlocal peak
        peak = max(peak, rss_mib(pid))
        found = client.get(f"/tasks/{task_id}", node="mem-1")["tasks"][0]
        return bool(found["state"] in ("succeeded", "failed", "timed_out"))
    wait_until(flood_done, 600, 0.2)
    for sock in socks:
        sock.close()
    return peak, requests


def run(output_mb: int, readers: int, bursts: int = 2) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hostile-mem-") as tmp:
        work = Path(tmp)
        mqtt_port = free_port()
        serve, api = _serve(["--embedded-broker", f"127.0.0.1:{mqtt_port}"], work)
        agent = _agent(f"mqtt://127.0.0.1:{mqtt_port}", "mem-1", work)
        try:
            _wait_node(api, "mem-1")
            token = (work / "sched.db.admin-token").read_text().strip()
            client = Client(api, token=token)
            port = int(api.rsplit(":", 1)[1])
            # warm up: one of each kind, so idle counts imported code, not first use
            client.post("/tasks", {"targets": ["mem-1"], "task": {
                "type": "shell", "command": "echo warm", "id": "warm"}})
            for path in ("/tasks", "/nodes", "/jobs", "/rollouts", "/openapi.json"):
                client.get(path)
            hostile(port, token)  # the code paths of the burst, once, before idle
            wait_until(lambda: client.get("/tasks", state="succeeded")["tasks"], 30, 0.2)
            idle = settle(serve.pid)
            out: dict[str, Any] = {
                "bench": "hostile_memory", "mode": "small (--embedded-broker)",
                "readers": readers, "output_mb": output_mb, "idle_mib": round(idle, 1)}
            for n in range(1, bursts + 1):  # later bursts tell one-time growth from a leak
                peak, requests = burst(client, serve.pid, port, token, readers, output_mb, n)
                after = settle(serve.pid, 5.0)
                out.update({f"burst{n}_requests": requests, f"burst{n}_peak_mib": round(peak, 1),
                            f"after{n}_mib": round(after, 1),
                            f"after{n}_minus_idle_mib": round(after - idle, 1)})
            return out
        finally:
            agent.terminate()
            serve.terminate()
            agent.wait(10)
            serve.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-mb", type=int, default=50)
    parser.add_argument("--readers", type=int, default=10)
    parser.add_argument("--bursts", type=int, default=2)
    args = parser.parse_args(argv)
    print(json.dumps(run(args.output_mb, args.readers, args.bursts)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
