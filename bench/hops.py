"""Where a light-load round trip's time goes, hop by hop: `python bench/hops.py [N]`.

As bench item 2's light phase (bench/roundtrip.py): 100 real agents in 4 processes
of 25 (tests/agent_pool.py), `true` sent one task at a time through MqttMessenger,
round robin over the nodes. Each process wraps a few functions (not the code
measured: the wrappers only append a CLOCK_MONOTONIC stamp to a list) and every
stamp is compared on one clock, which Linux keeps system-wide. A task's stamps are
those between its send and its `succeeded`: only one task is out at a time.
Prints p50/p99 per hop in ms; not part of ./build.sh bench.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STAMPS: list[tuple[int, str]] = []
_now = time.monotonic_ns


def _mark(name: str) -> None:
    STAMPS.append((_now(), name))


def _wrap(owner: Any, attr: str, before: str | None = None, after: str | None = None,
          when: Any = None) -> None:
    inner = getattr(owner, attr)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if before and (when is None or when(args, kwargs)):
            _mark(before)
        result = inner(*args, **kwargs)
        if after and (when is None or when(args, kwargs)):
            _mark(after)
        return result
    setattr(owner, attr, wrapper)


def _kind(data: Any) -> str:
    raw = bytes(data[:400])
    for state in (b"accepted", b"running", b"succeeded"):
        if b'"state":"' + state in raw:
            return state.decode()
    if raw[:1] and raw[0] & 0xF0 == 0x40:
        return "puback"
    if b"/tasks/" in raw:
        return "task"
    return "other"


def _stamp_io() -> None:
    """Each send (by what it carries) and each recv of paho's sockets."""
    import paho.mqtt.client as paho
    inner_send, inner_recv = paho.Client._sock_send, paho.Client._sock_recv

    def send(self: Any, buf: Any) -> Any:
        sent = inner_send(self, buf)
        _mark(f"send {_kind(buf)}")
        return sent

    def recv(self: Any, size: int) -> Any:
        data = inner_recv(self, size)
        _mark("recv")
        return data
    paho.Client._sock_send = send  # type: ignore[method-assign]
    paho.Client._sock_recv = recv  # type: ignore[method-assign]


def agent_main(argv: list[str]) -> int:
    """One pool of agents with stamps: `hops.py agent URL PREFIX FIRST COUNT DIR OUT`."""
    from edgerun.agent import core, shell
    from edgerun.agent.contain import Containment
    from edgerun.agent.store import TaskLog
    from edgerun.mqtt import MqttConnection
    from tests import agent_pool
    _stamp_io()
    _wrap(MqttConnection, "_handle_message", "agent on_message")
    _wrap(core.Agent, "_handle", "dispatcher picks it up")
    _wrap(TaskLog, "sync", after="accepted synced")
    _wrap(os, "fdatasync", "fdatasync begins", "fdatasync returns")
    _wrap(core.Agent, "_execute", "worker picks it up")
    _wrap(Containment, "spawn", "spawn begins", "spawned")
    _wrap(shell.subprocess.Popen, "_execute_child", "fork begins", "fork done")
    _wrap(shell, "_pump", after="pipes closed")
    _wrap(shell.selectors.DefaultSelector, "select", after="select returns")
    _wrap(Containment, "end", "contain.end begins", "contain.end done")
    _wrap(core.Agent, "_final", "final update begins", "final update queued")
    out = argv.pop()
    try:
        return agent_pool.main(argv)
    finally:
        Path(out).write_text(json.dumps(STAMPS))


def driver(tasks: int) -> dict[str, Any]:
    from bench.common import ROOT, mosquitto, percentile
    from edgerun.protocol import Channel, ShellTask, encode
    from edgerun.scheduler.messaging import Incoming
    from edgerun.scheduler.messaging.mqtt import MqttMessenger
    from edgerun.settings import parse_broker_url
    _stamp_io()
    work = Path(tempfile.mkdtemp(prefix="hops-"))
    broker = mosquitto(work / "mosquitto")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(
        [sys.executable, __file__, "agent", broker.url, "rt", str(p * 25), "25",
         str(work / f"agents{p}"), str(work / f"stamps{p}.json")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) for p in range(4)]
    for proc in procs:
        assert proc.stdout is not None
        proc.stdout.readline()
    time.sleep(8.0)  # a hundred agents connected, subscribed and idle
    done = threading.Event()
    messenger = MqttMessenger(parse_broker_url(broker.url, ("mqtt",)), record_external=False,
                              client_id=f"hops-{uuid.uuid4().hex[:6]}", events_topic="")

    def deliver(msg: Incoming) -> None:
        if msg.channel == Channel.UPDATES and b'"succeeded"' in msg.payload:
            _mark("messenger delivers succeeded")
            done.set()
        messenger.ack(msg)
    windows: list[tuple[int, int]] = []
    try:
        messenger.start(deliver)
        assert messenger.connected.wait(10)
        time.sleep(1.0)
        STAMPS.clear()
        for i in range(tasks):
            payload = encode(ShellTask(id=uuid.uuid4().hex, command="true", timeout=60))
            done.clear()
            start = _now()
            _mark("dispatch")
            messenger.send(f"rt{i % 100:03d}", payload)
            done.wait(30)
            _mark("driver wakes")
            windows.append((start, _now()))
        messenger.stop()
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(60)
        broker.stop()
    stamps = list(STAMPS)
    for p in range(4):
        stamps += [(t, f"agent: {n}") if not n.startswith("agent") else (t, n)
                   for t, n in json.loads((work / f"stamps{p}.json").read_text())]
    stamps.sort()
    skip = ("recv", "send other", "send puback", "agent: send puback")
    at: dict[str, list[float | None]] = {}
    totals = []
    for n, (start, end) in enumerate(windows):
        totals.append((end - start) / 1e6)
        for t, name in stamps:
            if start <= t <= end and name not in skip:
                row = at.setdefault(name, [None] * len(windows))
                if row[n] is None:  # the first of its kind in this round trip
                    row[n] = (t - start) / 1e6
    present = {k: [v for v in row if v is not None] for k, row in at.items()}
    order = sorted((k for k, v in present.items() if len(v) >= len(windows) // 2),
                   key=lambda k: percentile(present[k], 50))
    table: dict[str, dict[str, float]] = {}
    for prev, name in itertools.pairwise(order):
        steps = [b - a for a, b in zip(at[prev], at[name], strict=True)
                 if a is not None and b is not None]
        table[f"{prev} -> {name}"] = {
            "n": len(steps), "p50_ms": round(percentile(steps, 50), 3),
            "p99_ms": round(percentile(steps, 99), 3),
            "since_dispatch_p50_ms": round(percentile(present[name], 50), 3)}
    return {"tasks": tasks, "loadavg": os.getloadavg(),
            "total": {"p50_ms": round(percentile(totals, 50), 3),
                      "p99_ms": round(percentile(totals, 99), 3)}, "hops": table}


def main() -> int:
    if sys.argv[1:2] == ["agent"]:
        return agent_main(sys.argv[2:])
    result = driver(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
    print(f"total p50 {result['total']['p50_ms']} p99 {result['total']['p99_ms']} ms, "
          f"load {result['loadavg'][0]:.1f}")
    print("  hop p50  hop p99  (ms; the second stamp's p50 since dispatch)")
    for name, row in result["hops"].items():
        print(f"  {row['p50_ms']:7.3f} {row['p99_ms']:7.3f}  at {row['since_dispatch_p50_ms']:6.3f}"
              f"  (n={row['n']:3d})  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
