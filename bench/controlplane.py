"""Item 9, the control plane: updates recorded per second (SQLite against PostgreSQL, one
`serve` against three on one database), the cost of a fleet re-sync at 10,000 nodes, and
the fan-out of one `edgerun run` through serve to as many nodes beside PGQueuer's drain
rate and the bridge alone (bench/fanout.py's item9_fanout renders that part).

Updates: `updates` final updates, each preceded by `accepted` and `running` (so 3 x
`updates` messages), published at QoS 1 as fast as Mosquitto takes them by one
publisher, for task ids no store knows yet (the store records them as seen only
from their updates). The clock runs from the first publish until the store holds
every final state. Three instances share the work through a `$share/` group.

Re-sync: 10,000 nodes' retained statuses (about 600 bytes each, with facts) on
Mosquitto; a scheduler with a store that knows them all starts with a new client id;
the clock runs until every node's `last_seen` is newer than the start. Direct mode
(the wildcard brings them, then the exact re-sync subscriptions bring them again)
and AMQP mode through the bridge (its re-sync answer re-subscribes to the wildcard).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import ROOT, mosquitto
from tests.brokers import free_port, wait_until

PG_ADMIN = os.environ.get("EDGERUN_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _pg_database() -> tuple[str, str]:
    import psycopg
    name = f"edgerun_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    return name, PG_ADMIN.rpartition("/")[0] + f"/{name}"


def _drop(name: str) -> None:
    import psycopg
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


class Serve:
    """`edgerun serve` as a process, listening once the constructor returns. A port that
    `free_port()` picked can be taken before serve binds it (a swarm of 10,000 clients
    holds as many ephemeral ports): then serve exits, and it is started again on
    another port, up to 5 times."""

    def __init__(self, tmp: Path, broker: str, db: str, *args: str) -> None:
        self.dir = tmp / f"serve-{uuid.uuid4().hex[:6]}"
        self.dir.mkdir(parents=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("EDGERUN_CONFIG", None)
        self.log = open(self.dir / "serve.log", "wb")  # noqa: SIM115 - the process keeps it
        for _attempt in range(5):
            self.port = free_port()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgerun.scheduler", "serve", "--broker", broker, "--db",
                 db, "--listen", f"127.0.0.1:{self.port}", "--admin-token-file",
                 str(self.dir / "token"), "--log-level", "warning", *args],
                stdout=self.log, stderr=self.log, env=env, cwd=self.dir)
            if wait_until(lambda: self.proc.poll() is not None or self._listening(), 120, 0.1) \
                    and self.proc.poll() is None:
                return
        raise RuntimeError(f"serve did not start; see {self.dir / 'serve.log'}")

    def _listening(self) -> bool:
        import socket
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _finals(db: str) -> int:
    from edgerun.scheduler.store.tasks import Store
    store = Store(db)
    try:
        return store.count_by_state().get("succeeded", 0)
    finally:
        store.close()


def _publish_updates(url: str, count: int, tag: str) -> None:
    from edgerun.mqtt import MqttConnection
    from edgerun.protocol import format_time
    from edgerun.settings import parse_broker_urls
    conn = MqttConnection(parse_broker_urls(url, ("mqtt",)), f"bench-pub-{tag}",
                          clean_session=True, name="bench-pub", max_inflight=1000)
    conn.start()
    assert conn.connected.wait(15)
    for i in range(count):
        node = f"b{i % 100:03d}"
        for state in ("accepted", "running", "succeeded"):
            body = {"v": 1, "kind": "update", "id": f"{tag}-{i}", "node": node, "state": state,
                    "at": format_time()}
            if state == "succeeded":
                body.update(exit_code=0, stdout="", stderr="", duration_s=0.01)
            conn.publish(f"edgerun/nodes/{node}/updates", json.dumps(body).encode(), 1)
    conn.flush(120)
    conn.stop()


def updates_rate(tmp: Path, broker_url: str, db: str, instances: int, count: int) -> dict[str, Any]:
    group = uuid.uuid4().hex[:6]
    serves = [Serve(tmp, broker_url, db, "--client-id", f"bench-{group}-{i}", "--share-group",
                    group, "--tick", "1") for i in range(instances)]
    try:
        time.sleep(4.0)  # started and subscribed (the persistent sessions exist from here)
        before = _finals(db)
        t0 = time.monotonic()
        _publish_updates(broker_url, count, group)
        published = time.monotonic() - t0
        ok = wait_until(lambda: _finals(db) - before >= count, 600, 0.2)
        elapsed = time.monotonic() - t0
        return {"instances": instances, "updates": 3 * count, "complete": ok,
                "seconds": round(elapsed, 2), "publish_seconds": round(published, 2),
                "updates_per_s": round(3 * count / elapsed, 1)}
    finally:
        for serve in serves:
            serve.stop()


def _retained_statuses(url: str, nodes: int) -> None:
    from edgerun.mqtt import MqttConnection
    from edgerun.settings import parse_broker_urls
    conn = MqttConnection(parse_broker_urls(url, ("mqtt",)), f"bench-st-{uuid.uuid4().hex[:6]}",
                          clean_session=True, name="bench-status", max_inflight=1000)
    conn.start()
    assert conn.connected.wait(15)
    for i in range(nodes):
        node = f"rs{i:05d}"
        body = {"v": 1, "kind": "status", "node": node, "state": "online",
                "at": "2026-11-29T00:00:00.000Z", "agent": "0.1",
                "facts": {"hostname": node, "kernel": "6.1.0", "arch": "x86_64",
                          "macs": ["52:54:00:12:34:56"], "ips": ["10.0.0.1"], "cpus": 8,
                          "mem_bytes": 17179869184, "dmi": {"vendor": "bench", "product": "x",
                                                            "serial": f"S{i}"}},
                "running": []}
        conn.publish(f"edgerun/nodes/{node}/status", json.dumps(body).encode(), 1, retain=True)
    conn.flush(120)
    conn.stop()


def _seed_store(db: str, nodes: int) -> None:
    from edgerun.protocol import Status
    from edgerun.scheduler.store.tasks import Store
    store = Store(db)
    try:
        for i in range(nodes):
            store.apply_status(Status(f"rs{i:05d}", "offline"))
    finally:
        store.close()


def _fresh_since(db: str, stamp: str) -> int:
    from edgerun.scheduler.store.tasks import Store
    store = Store(db)
    try:
        return sum(1 for n in store.nodes() if n.last_seen > stamp)
    finally:
        store.close()


def resync_cost(tmp: Path, nodes: int, broker: Any, amqp: str | None = None) -> dict[str, Any]:
    from edgerun.protocol import format_time
    db = str(tmp / f"resync-{uuid.uuid4().hex[:6]}.db")
    _seed_store(db, nodes)
    stamp = format_time()
    t0 = time.monotonic()
    url = amqp or broker.url
    serve = Serve(tmp, url, db, "--client-id", f"resync-{uuid.uuid4().hex[:6]}",
                  "--queue", f"resync-{uuid.uuid4().hex[:6]}")
    try:
        ok = wait_until(lambda: _fresh_since(db, stamp) >= nodes, 300, 0.5)
        elapsed = time.monotonic() - t0
        return {"mode": "amqp (bridge)" if amqp else "direct", "nodes": nodes, "complete": ok,
                "seconds_from_start": round(elapsed, 2)}
    finally:
        serve.stop()


def item9(tmp: Path, *, updates: int, nodes: int, rounds: int = 2,
          jobs: int = 20_000) -> dict[str, Any]:
    out: dict[str, Any] = {"updates": [], "resync": []}
    out["fanout"] = _fanout(tmp, nodes, rounds, jobs)
    broker = mosquitto(tmp / "mosquitto")
    name, pg = _pg_database()
    try:
        for label, db, instances in (("sqlite", str(tmp / "u.db"), 1), ("postgresql", pg, 1),
                                     ("postgresql", pg, 3)):
            if label == "postgresql":
                from edgerun.scheduler.store.tasks import Store
                Store(pg).close()  # schema in place before several instances race for it
            row = updates_rate(tmp, broker.url, db, instances, updates)
            out["updates"].append({"store": label, **row})
        _retained_statuses(broker.url, nodes)
        out["resync"].append(resync_cost(tmp, nodes, broker))
        out["resync"].append(_resync_amqp(tmp, nodes, broker))
    finally:
        _drop(name)
        broker.stop()
    return out


def _fanout(tmp: Path, nodes: int, rounds: int, jobs: int) -> dict[str, Any]:
    """The fan-out through serve (bench/fanout.py) on a Mosquitto of its own: its swarm's
    retained statuses stay off the re-sync's broker."""
    from bench.fanout import item9_fanout  # it imports this module
    broker = mosquitto(tmp / "mosquitto-fanout")
    try:
        return item9_fanout(tmp / "fanout", broker.url, nodes, rounds, jobs)
    finally:
        broker.stop()


def _resync_amqp(tmp: Path, nodes: int, broker: Any) -> dict[str, Any]:
    from tests.bridgekit import BridgeProcess
    from tests.rabbit import Rabbit
    rabbit = Rabbit(tmp / "rabbit").start()
    bridge = BridgeProcess(broker.url, rabbit.url, tmp / "bridge")
    try:
        bridge.start().wait_ready()
        return resync_cost(tmp, nodes, broker, amqp=rabbit.url)
    finally:
        if bridge.alive():
            bridge.terminate()
        rabbit.stop()


def render(r: dict[str, Any]) -> list[str]:
    lines = ["## 9. Control plane: updates recorded, re-sync, fan-out through serve", "",
             "Updates recorded per second end to end (MQTT in, the store's final state "
             "committed), one publisher at QoS 1; three instances split them through a "
             "`$share/` group on one PostgreSQL database.", "",
             "| store | instances | updates | seconds | updates/s | complete |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {x['store']} | {x['instances']} | {x['updates']:,} | {x['seconds']} | "
              f"{x['updates_per_s']:,} | {'yes' if x['complete'] else 'no'} |"
              for x in r["updates"]]
    lines += ["", "Re-sync: a scheduler with a new client id (and a new queue) whose store "
              "knows every node; seconds from its start until every node's status is "
              "fresh.", "", "| mode | nodes | seconds | complete |", "|---|---|---|---|"]
    lines += [f"| {x['mode']} | {x['nodes']:,} | {x['seconds_from_start']} | "
              f"{'yes' if x['complete'] else 'no'} |" for x in r["resync"]]
    if "fanout" in r:
        from bench.fanout import render_fanout
        lines += render_fanout(r["fanout"])
    return [*lines, ""]
