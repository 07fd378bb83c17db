"""Drive bench/swarm.py processes, publish tasks over AMQP and count what succeeds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

import pika

from bench.common import ROOT
from edgerun.protocol import ShellTask, encode

PER_PROCESS = 2500  # well under the 20,000 descriptors of one process


class SwarmGroup:
    """`count` simulated nodes over ceil(count / PER_PROCESS) processes."""

    def __init__(self, broker: str, count: int, node_prefix: str = "s",
                 connect_rate: float = 2000.0, churn_rate: float = 0.0,
                 churn_from: int = -1, duration: float = 900.0,
                 processes: int | None = None, echo: bool = False) -> None:
        self.count = count
        self.processes = processes or max(1, -(-count // PER_PROCESS))
        per = -(-count // self.processes)
        self.nodes: list[str] = []
        self.procs: list[subprocess.Popen[str]] = []
        self.latest: list[dict[str, Any]] = []
        self._threads: list[threading.Thread] = []
        first = 0
        for _ in range(self.processes):
            n = min(per, count - first)
            if n <= 0:
                break
            cmd = [sys.executable, str(ROOT / "bench" / "swarm.py"), "--broker", broker,
                   "--node-prefix", node_prefix, "--first", str(first), "--count", str(n),
                   "--connect-rate", str(connect_rate / self.processes),
                   "--duration", str(duration)]
            if echo:
                cmd.append("--echo")
            if churn_rate > 0:
                cmd += ["--churn-rate", str(churn_rate / self.processes),
                        "--churn-from", str(churn_from if churn_from >= 0 else 0)]
            self.nodes += [f"{node_prefix}{i:05d}" for i in range(first, first + n)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    text=True, cwd=ROOT)
            self.procs.append(proc)
            self.latest.append({})
            thread = threading.Thread(target=self._read, args=(len(self.procs) - 1,),
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
            first += n

    def _read(self, index: int) -> None:
        stdout = self.procs[index].stdout
        assert stdout is not None
        for line in stdout:
            try:
                stats = json.loads(line)
            except ValueError:
                continue
            if "ready" in self.latest[index]:
                stats.setdefault("ready", self.latest[index]["ready"])
            self.latest[index] = stats

    def ready_at(self) -> float | None:
        times = [s.get("ready") for s in self.latest]
        return None if any(t is None for t in times) else max(float(t) for t in times)

    def wait_ready(self, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = self.ready_at()
            if ready is not None:
                return ready
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError("a swarm process ended early")
            time.sleep(0.1)
        raise RuntimeError(f"swarm not ready after {timeout} s: "
                           f"{sum(int(s.get('ready_nodes', 0)) for s in self.latest)} nodes up")

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for stats in self.latest:
            for key, value in stats.items():
                if isinstance(value, int | float) and not isinstance(value, bool) \
                        and key not in ("t", "ready"):
                    out[key] = out.get(key, 0) + value
        return out

    def stop(self) -> dict[str, float]:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for thread in self._threads:
            thread.join(5)
        return self.totals()

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]


class Finals:
    """Counts final `succeeded` updates per task id from an AMQP exchange."""

    def __init__(self, url: str, exchange: str, binding: str) -> None:
        self.url, self.exchange, self.binding = url, exchange, binding
        self.queue = f"bench-finals-{uuid.uuid4().hex[:8]}"
        self.done: dict[str, float] = {}
        self.other = 0
        self.cond = threading.Condition()
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Finals:
        self._thread.start()
        assert self.ready.wait(30), "the AMQP consumer could not start"
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        ch = conn.channel()
        ch.exchange_declare(self.exchange, "topic", durable=True)
        ch.queue_declare(self.queue, exclusive=True, auto_delete=True)
        ch.queue_bind(self.queue, self.exchange, self.binding)
        ch.basic_qos(prefetch_count=2000)

        def on_message(_ch: Any, _method: Any, _props: Any, payload: bytes) -> None:
            if b'"succeeded"' not in payload:
                return
            update = json.loads(payload)
            with self.cond:
                if update["id"] not in self.done:
                    self.done[update["id"]] = time.monotonic()
                    self.cond.notify_all()

        ch.basic_consume(self.queue, on_message, auto_ack=True)
        self.ready.set()
        while not self._stop.is_set():
            conn.process_data_events(time_limit=0.1)
        conn.close()

    def wait(self, ids: Iterable[str], timeout: float) -> bool:
        wanted = list(ids)
        with self.cond:
            return self.cond.wait_for(lambda: all(i in self.done for i in wanted), timeout)

    def count(self, ids: Iterable[str]) -> int:
        with self.cond:
            return sum(1 for i in ids if i in self.done)


def task_payload(task_id: str) -> bytes:
    return encode(ShellTask(id=task_id, command="true", timeout=60))


def publish_tasks(url: str, exchange: str, keyed: list[tuple[str, str]],
                  batch: int = 500) -> None:
    """(routing key, task id) pairs, persistent, in transactions of `batch`."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.exchange_declare(exchange, "topic", durable=True)
        ch.tx_select()
        props = pika.BasicProperties(content_type="application/json", delivery_mode=2)
        for i, (key, task_id) in enumerate(keyed, 1):
            ch.basic_publish(exchange, key, task_payload(task_id), props)
            if i % batch == 0:
                ch.tx_commit()
        ch.tx_commit()
    finally:
        conn.close()


class PacedPublisher:
    """Tasks at a steady rate in a thread, one persistent publish each, until stopped."""

    def __init__(self, url: str, exchange: str, keys: list[str], rate: float,
                 max_seconds: float) -> None:
        self.url, self.exchange, self.keys, self.rate = url, exchange, keys, rate
        self.max_seconds = max_seconds
        self.ids: list[str] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PacedPublisher:
        self._thread.start()
        return self

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(30)
        return self.ids

    def _run(self) -> None:
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        ch = conn.channel()
        ch.confirm_delivery()
        props = pika.BasicProperties(content_type="application/json", delivery_mode=2)
        started = time.monotonic()
        i = 0
        while not self._stop.is_set() and time.monotonic() - started < self.max_seconds:
            pause = started + i / self.rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            task_id = uuid.uuid4().hex
            try:
                ch.basic_publish(self.exchange, self.keys[i % len(self.keys)],
                                 task_payload(task_id), props)
                self.ids.append(task_id)
            except pika.exceptions.AMQPError:
                self.errors += 1
            i += 1
        conn.close()


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
