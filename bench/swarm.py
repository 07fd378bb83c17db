"""Many simulated nodes in one process: real paho MQTT clients on ONE epoll loop.

Each node is its own MQTT client (`edgerun-agent-<node>`, persistent session,
Last Will, retained online status), subscribed to its tasks topic at QoS 1, and
answers each task with `accepted`, `running` and `succeeded` (exit code 0, empty
output) built with `edgerun.protocol`. The nodes speak the contract; they do
not fork processes. With `--echo`, a task whose command is `echo ARGS` (a string or an
argv) succeeds with stdout `ARGS\n`, as `/bin/echo` would print it (bench/workqueue.py).
With `--churn-rate R`, the nodes from `--churn-from` on leave and come back: R clean
disconnects and R reconnects per second.

    python bench/swarm.py --broker mqtt://127.0.0.1:1883 --first 0 --count 2500

Prints one JSON line per second with its counters, `{"ready": ...}` once every
node is connected and subscribed, and a final line on SIGTERM or at --duration.
"""

from __future__ import annotations

import argparse
import collections
import json
import selectors
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgerun.protocol import (
    State, Status, Topics, Update, encode, format_time, last_will,
)
from edgerun.settings import parse_broker_url

FACTS = {"hostname": "swarm", "kernel": "sim", "arch": "x86_64", "macs": [], "ips": [],
         "cpus": 1, "mem_bytes": 0}


class Swarm:
    def __init__(self, host: str, port: int, prefix: str, nodes: list[str],
                 churn_from: int, echo: bool = False) -> None:
        self.host, self.port = host, port
        self.echo = echo
        self.topics = Topics(prefix)
        self.sel = selectors.DefaultSelector()
        self.clients: dict[str, paho.Client] = {}
        self.ready: set[str] = set()
        self.counts: collections.Counter[str] = collections.Counter()
        self.seen: dict[str, set[str]] = {}
        self.to_connect: collections.deque[str] = collections.deque(nodes)
        self.churn_up: collections.deque[str] = collections.deque()  # connected churn nodes
        self.churn_down: collections.deque[str] = collections.deque()
        self.churn_set = set(nodes[churn_from:])
        self.connect_started: dict[str, float] = {}
        for node in nodes:
            self.clients[node] = self._client(node)

    # --- one client ---------------------------------------------------------------
    def _client(self, node: str) -> paho.Client:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"edgerun-agent-{node}",
                             clean_session=False, protocol=paho.MQTTv311, userdata=node)
        client.max_inflight_messages_set(100)
        client.will_set(self.topics.status(node), encode(last_will(node)), 1, True)
        client.on_socket_open = self._sock_open
        client.on_socket_close = self._sock_close
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._no_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _sock_open(self, client: paho.Client, node: Any, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sel.register(sock, selectors.EVENT_READ, client)

    def _sock_close(self, client: paho.Client, node: Any, sock: Any) -> None:
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _want_write(self, client: paho.Client, node: Any, sock: Any) -> None:
        try:
            self.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
        except (KeyError, ValueError):
            pass

    def _no_write(self, client: paho.Client, node: Any, sock: Any) -> None:
        try:
            self.sel.modify(sock, selectors.EVENT_READ, client)
        except (KeyError, ValueError):
            pass

    def _on_connect(self, client: paho.Client, node: str, flags: Any, rc: Any,
                    props: Any = None) -> None:
        if rc.is_failure:
            self.counts["errors"] += 1
            self.counts["connack_failed"] += 1
            return
        self.counts["connects"] += 1
        started = self.connect_started.pop(node, None)
        if started is not None:
            self.counts["connect_ms_total"] += int((time.monotonic() - started) * 1000)
        status = Status(node=node, state="online", at=format_time(), agent="swarm",
                        facts=FACTS, running=())
        client.publish(self.topics.status(node), encode(status), 1, True)
        client.subscribe(self.topics.tasks(node), 1)

    def _on_subscribe(self, client: paho.Client, node: str, mid: int, codes: Any,
                      props: Any = None) -> None:
        self.ready.add(node)
        if node in self.churn_set and node not in self.churn_up:
            self.churn_up.append(node)

    def _on_disconnect(self, client: paho.Client, node: str, flags: Any, rc: Any,
                       props: Any = None) -> None:
        self.ready.discard(node)
        if rc.is_failure:  # not asked for: the broker or the network dropped us
            self.counts["errors"] += 1
            self.counts["dropped"] += 1
            self.to_connect.append(node)
        else:
            self.counts["disconnects"] += 1
            self.churn_down.append(node)

    def _on_message(self, client: paho.Client, node: str, msg: paho.MQTTMessage) -> None:
        try:
            task = json.loads(msg.payload)
            task_id = str(task["id"])
        except (ValueError, KeyError, TypeError):
            self.counts["bad_messages"] += 1
            return
        if task.get("kind") != "task":
            return
        seen = self.seen.setdefault(node, set())
        topic = self.topics.updates(node)
        if task_id in seen:
            self.counts["duplicates"] += 1
        else:
            seen.add(task_id)
            self.counts["tasks"] += 1
            for state in (State.ACCEPTED, State.RUNNING):
                client.publish(topic, encode(Update(task_id, node, state, format_time())), 1)
        stdout = echoed(task.get("command")) if self.echo else ""
        done = Update(task_id, node, State.SUCCEEDED, format_time(), exit_code=0, stdout=stdout,
                      stderr="", truncated=False, duration_s=0.0)
        client.publish(topic, encode(done), 1)

    # --- the loop -----------------------------------------------------------------
    def connect(self, node: str) -> None:
        client = self.clients[node]
        self.connect_started[node] = time.monotonic()
        try:
            client.connect(self.host, self.port, keepalive=60)
            self.counts["connect_calls"] += 1
        except OSError:
            self.counts["errors"] += 1
            self.counts["connect_failed"] += 1
            self.to_connect.append(node)

    def poll(self, timeout: float) -> None:
        for key, mask in self.sel.select(timeout):
            client: paho.Client = key.data
            if mask & selectors.EVENT_READ:
                client.loop_read(100)
            if mask & selectors.EVENT_WRITE and client.socket() is not None:
                client.loop_write()

    def misc(self) -> None:
        for client in self.clients.values():
            if client.socket() is not None:
                client.loop_misc()


def echoed(command: Any) -> str:
    """What `echo ARGS` prints (a string command split on blanks, or an argv); "" else."""
    argv = command.split() if isinstance(command, str) else command
    if not isinstance(argv, list) or not argv or argv[0] not in ("echo", "/bin/echo"):
        return ""
    return " ".join(str(a) for a in argv[1:]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", required=True)
    parser.add_argument("--prefix", default="edgerun")
    parser.add_argument("--node-prefix", default="s")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--connect-rate", type=float, default=2000.0,
                        help="new connections per second at start-up")
    parser.add_argument("--churn-rate", type=float, default=0.0)
    parser.add_argument("--churn-from", type=int, default=-1,
                        help="index (within this process) of the first churning node")
    parser.add_argument("--duration", type=float, default=900.0, help="stop after S seconds")
    parser.add_argument("--echo", action="store_true",
                        help="answer `echo ARGS` tasks with stdout ARGS (else empty output)")
    args = parser.parse_args(argv)
    try:
        url = parse_broker_url(args.broker, ("mqtt",))
    except ValueError as exc:
        parser.error(str(exc))
    if args.count < 1:
        parser.error("--count must be at least 1")
    nodes = [f"{args.node_prefix}{i:05d}" for i in range(args.first, args.first + args.count)]
    churn_from = args.churn_from if args.churn_from >= 0 else len(nodes)
    swarm = Swarm(url.host, url.port, args.prefix, nodes, churn_from, args.echo)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    started = time.monotonic()
    deadline = started + args.duration
    last_misc = last_report = started
    ready_sent = False
    churn_started: float | None = None
    churned = debt = 0

    def report(**extra: Any) -> None:
        line = {"t": round(time.monotonic() - started, 3), "ready_nodes": len(swarm.ready),
                **swarm.counts, **extra}
        print(json.dumps(line), flush=True)

    while not stop["now"] and time.monotonic() < deadline:
        now = time.monotonic()
        budget = max(1, int(args.connect_rate * 0.01))
        while swarm.to_connect and budget:
            swarm.connect(swarm.to_connect.popleft())
            budget -= 1
        swarm.poll(0.01)
        now = time.monotonic()
        if not ready_sent and len(swarm.ready) == len(nodes):
            ready_sent = True
            report(ready=round(now - started, 3))
            churn_started = now
        if args.churn_rate > 0 and churn_started is not None:
            due = int((now - churn_started) * args.churn_rate) - churned
            for _ in range(min(due, 1000)):
                churned += 1
                debt += 1  # a connect owed, paid once a node has finished leaving
                if swarm.churn_up:
                    swarm.clients[swarm.churn_up.popleft()].disconnect()
            while debt and swarm.churn_down:
                debt -= 1
                swarm.connect(swarm.churn_down.popleft())
            swarm.counts["churn_events"] = churned
        if now - last_misc > 1.0:
            swarm.misc()
            last_misc = now
        if now - last_report > 1.0:
            report()
            last_report = now
    for client in swarm.clients.values():
        if client.socket() is not None:
            client.disconnect()
            client.loop_write()
    report(final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
