"""Several instances in MQTT mode: a dead instance's session is adopted by a live one.

Mosquitto keeps a persistent session's share of a `$share/` group's messages, and the
messages it had sent but not yet had acknowledged, until that client comes back. An
instance killed for good would keep some updates forever. So each instance of a share
group registers its client id in the store (`meta` rows `mqtt_member:{client id}`), holds
a PostgreSQL advisory lock named after it on a connection of its own for as long as it
lives, and writes a heartbeat there every few seconds (the database's clock, so no two
clocks are compared). A member is dead when its heartbeat is older than `STALE_S` and
its lock is free: the lock alone would not do, since a PostgreSQL restart frees every
lock at once while their holders live on. The instance that takes a dead member's lock
adopts that member's MQTT session: it connects with the dead client id
(`clean_session=False`, so the broker delivers everything queued and in flight),
unsubscribes every filter at once (nothing new is routed to it), hands each message to
its own service like its own ones and acknowledges it once recorded, and when all are
acknowledged and none came for `QUIET_S`, connects once more with a clean session,
which makes the broker drop the session; then it deletes the registration.

An instance that restarts with the same client id waits for its lock first, so it never
races an adoption of its own old session.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from edgerun.mqtt import Inbound, MqttConnection, TLSFiles
from edgerun.settings import BrokerURL

log = logging.getLogger(__name__)

QUIET_S = 2.0
STALE_S = 15.0
ADOPT_TIMEOUT_S = 120.0
CHECK_EVERY_S = 3.0
PREFIX = "mqtt_member:"


def _sql(name: str) -> str:
    """A named query of the store's PostgreSQL file (store/sql/postgresql.sql)."""
    from edgerun.scheduler.store import queries
    return queries.of("postgresql")[name]


def member_key(client_id: str) -> int:
    """The advisory lock key of a member: 64 bits of a hash of its client id."""
    digest = hashlib.sha256(f"edgerun-mqtt-member:{client_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Members:
    """The share group's members in the store, and their liveness locks."""

    def __init__(self, url: str, group: str, client_id: str) -> None:
        self.url, self.group, self.client_id = url, group, client_id
        self._conn: Any = None
        self._own = False
        self._since = time.monotonic()

    def _db(self) -> Any:
        if self._conn is None or self._conn.closed or self._conn.broken:
            from edgerun.scheduler.store.db import pg_connect
            self._own = False
            self._conn = pg_connect(self.url)
            self._since = time.monotonic()
        return self._conn

    def claim(self, stop: threading.Event) -> bool:
        """Take this instance's own lock (waiting while an adoption of its old session
        runs), then register; False if stopped first."""
        said = False
        while not stop.is_set():
            try:
                if self.heartbeat():
                    return True
                if not said:
                    log.warning("client id %s is held by another instance (adopting its "
                                "old session?); waiting", self.client_id)
                    said = True
            except Exception as exc:  # psycopg.Error or StoreError: try again
                log.warning("share group registry: %s", exc)
                self.drop()
            stop.wait(0.5)
        return False

    def heartbeat(self) -> bool:
        """Hold our own lock (again, after a reconnection) and say we are alive; False
        when another instance holds our lock."""
        db = self._db()
        if not self._own:
            row = db.execute(_sql("pg_try_lock"), (member_key(self.client_id),)).fetchone()
            if not row[0]:
                return False
            self._own = True
        seen = json.dumps({"group": self.group, "seen": self._now(db)})
        db.execute(_sql("set_meta"), (PREFIX + self.client_id, seen))
        return True

    @staticmethod
    def _now(db: Any) -> float:
        return float(db.execute(_sql("pg_clock")).fetchone()[0])

    def dead(self) -> list[str]:
        """Members silent for STALE_S whose lock this instance just took; it holds them.
        None in the first STALE_S after (re)connecting: after a PostgreSQL outage every
        heartbeat is old, and the live members need a round to write theirs again."""
        db = self._db()
        if time.monotonic() - self._since < STALE_S + CHECK_EVERY_S:
            return []
        now = self._now(db)
        out = []
        rows = db.execute(_sql("meta_like"), (PREFIX + "%",)).fetchall()
        for row in rows:
            client_id = str(row[0])[len(PREFIX):]
            try:
                info = json.loads(row[1])
            except ValueError:
                continue
            if client_id == self.client_id or not isinstance(info, dict) \
                    or info.get("group") != self.group \
                    or now - float(info.get("seen") or 0) < STALE_S:
                continue
            got = db.execute(_sql("pg_try_lock"), (member_key(client_id),)).fetchone()[0]
            if got:
                out.append(client_id)
        return out

    def done(self, client_id: str, adopted: bool) -> None:
        if adopted:
            self._db().execute(_sql("delete_meta"), (PREFIX + client_id,))
        self._db().execute(_sql("pg_unlock"), (member_key(client_id),))

    def drop(self) -> None:
        """Forget the session (its locks went with it); the next use opens a new one."""
        self._own = False  # the locks went with the session
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception as exc:  # already broken
                log.debug("share group registry: closing: %s", exc)

    def close(self) -> None:
        self.drop()  # our lock goes with the session


class Adopter:
    """The thread that looks for dead members and adopts their sessions."""

    def __init__(self, members: Members, urls: Sequence[BrokerURL], tls: TLSFiles | None,
                 filters: Callable[[], list[str]],
                 deliver: Callable[[Inbound, MqttConnection, Callable[[], None]], None]) -> None:
        self.members, self.urls, self.tls = members, urls, tls
        self.filters, self.deliver = filters, deliver
        self.adopted: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mqtt-adopter", daemon=True)

    def start(self) -> Adopter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30.0)
        self.members.close()

    def _run(self) -> None:
        while not self._stop.wait(CHECK_EVERY_S):
            try:
                if not self.members.heartbeat():
                    log.error("another instance holds the lock of client id %s: is the "
                              "same --client-id used twice?", self.members.client_id)
                dead = self.members.dead()
            except Exception as exc:  # the store is away: next round
                log.warning("share group registry: %s", exc)
                self.members.drop()
                continue
            for client_id in dead:
                adopted = False
                try:
                    adopted = self._adopt(client_id)
                except Exception:  # the broker is away: the lock goes back, next round
                    log.exception("could not adopt the session of %s", client_id)
                finally:
                    try:
                        self.members.done(client_id, adopted)
                    except Exception as exc:  # our connection died: so did the lock
                        log.warning("share group registry: %s", exc)
                        self.members.drop()

    def _adopt(self, client_id: str) -> bool:
        log.warning("instance %s is gone: adopting its MQTT session", client_id)
        pending = [0]
        last = [time.monotonic()]
        lock = threading.Lock()

        def acked() -> None:
            with lock:
                pending[0] -= 1

        def on_message(msg: Inbound) -> None:  # its network thread: only hands on
            with lock:
                pending[0] += 1
                last[0] = time.monotonic()
            self.deliver(msg, conn, acked)
        conn = MqttConnection(self.urls, client_id, on_message=on_message, clean_session=False,
                              manual_ack=True, tls=self.tls, name=f"adopt-{client_id}",
                              max_inflight=1000)
        conn.start()
        try:
            if not conn.connected.wait(15):
                return False
            for topic in self.filters():
                conn.unsubscribe(topic)
            give_up = time.monotonic() + ADOPT_TIMEOUT_S
            while not self._stop.is_set():
                if time.monotonic() > give_up:
                    log.warning("adopting %s: messages still unacknowledged after %.0f s; "
                                "trying again later", client_id, ADOPT_TIMEOUT_S)
                    return False
                with lock:
                    idle = pending[0] == 0 and time.monotonic() - last[0] >= QUIET_S
                if idle:
                    break
                self._stop.wait(0.1)
            conn.flush(5.0)
        finally:
            conn.stop()
        if self._stop.is_set():
            return False
        clean = MqttConnection(self.urls, client_id, clean_session=True, tls=self.tls,
                               name=f"adopt-{client_id}-clean")
        clean.start()
        try:
            clean.connected.wait(15)
        finally:
            clean.stop()
        self.adopted.append(client_id)
        log.warning("adopted and closed the MQTT session of %s", client_id)
        return True
