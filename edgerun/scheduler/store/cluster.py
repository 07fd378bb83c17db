"""Several `edgerun serve` instances on one PostgreSQL database: who runs the periodic
duties, and how each instance hears of the others' changes.

- `Lease`: the periodic duties (lost detection, expiry, re-sending what nobody sent,
  retention) run on one instance at a time, the holder of a session-level advisory
  lock (`pg_try_advisory_lock`) on a connection of its own. When the holder dies,
  even by kill -9, its session ends with its TCP connection and PostgreSQL releases
  the lock; the next instance to ask (every `--tick`) takes over. No clocks, no
  lease renewals, no home-made consensus: PostgreSQL is already the one thing every
  instance must reach.
- `Listener`: every event goes into the store's durable event log with the change
  it describes, and the transaction NOTIFYs the range of ids it logged (store/tx.py);
  each instance LISTENs on a connection of its own, reads the other instances'
  events of that range from the log on a second one, and hands them to its own
  hub (`relay`: not logged again), which delivers every id once, in id order, so an
  event stream opened on any instance sees every event in the one order. NOTIFY
  rather than the broker: it is delivered only if the events are committed, in
  commit order, in MQTT and AMQP mode alike, with no broker topology to add. A
  notification missed while the listener was away costs nothing: on reconnecting
  it reads the log up to the latest id. The notifications that arrived together are
  delivered as one (one read of the log for all of them), and a hub with no reader
  reads nothing back at all (events.py): with K instances each would otherwise read
  and parse the K-1 others' every event for nobody.

On SQLite (one instance) the lease is always held and there is nothing to listen to.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeGuard

from edgerun.backoff import Backoff
from edgerun.protocol import JSONObject
from edgerun.scheduler.errors import StoreError
from edgerun.scheduler.store import queries
from edgerun.scheduler.store.db import pg_connect
from edgerun.settings import redact
from edgerun.scheduler.store.events import EventHub, ReadLog

log = logging.getLogger(__name__)

DUTIES_LOCK = 0x6564_6765_7275_6E01  # "edgerun\1"


def _sql(name: str) -> str:
    """A named query of the PostgreSQL file (these connections are psycopg's own)."""
    return queries.of("postgresql")[name]


class Lease:
    """Whether this process holds the duties lock; asked every tick by the tracker."""

    def __init__(self, url: str, key: int = DUTIES_LOCK) -> None:
        self.url, self.key = url, key
        self._conn: Any = None
        self.held = False

    def check(self) -> bool:
        """True while held: taken now if free, verified alive if already ours."""
        try:
            if self._conn is None or self._conn.closed or self._conn.broken:
                self._drop()
                self._conn = pg_connect(self.url)
            if self.held:
                self._conn.execute(_sql("pg_ping"))
            else:
                row = self._conn.execute(_sql("pg_try_lock"), (self.key,))
                self.held = bool(row.fetchone()[0])
        except StoreError as exc:
            self._lost(str(exc))
        except Exception as exc:  # psycopg.Error: the session (and the lock) is gone
            self._lost(str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc))
        return self.held

    def _lost(self, why: str) -> None:
        if self.held:
            log.warning("lost the duties lock on %s: %s", redact(self.url), why)
        self._drop()

    def _drop(self) -> None:
        self.held = False
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception as exc:  # already broken
                log.debug("closing the lease connection: %s", exc)

    def release(self) -> None:
        self._drop()


class Listener:
    """LISTENs for the other instances' changes; `deliver` gets each message (a dict)."""

    def __init__(self, url: str, origin: str, deliver: Callable[[JSONObject], None],
                 on_connect: Callable[[], None] | None = None) -> None:
        self.url, self.origin, self.deliver = url, origin, deliver
        self.on_connect = on_connect
        self._reader: Any = None  # a second connection, for reading the log
        self._stop = threading.Event()
        self.ready = threading.Event()
        self.connections = 0  # LISTENs so far: more than one means it came back
        self.notes_heard = 0  # notifications received (ours included)
        self.notes_delivered = 0  # deliveries: several notifications make one
        self.rows_read = 0  # events read back from the log
        self._thread = threading.Thread(target=self._run, name="store-listener", daemon=True)

    def start(self) -> Listener:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        backoff = Backoff(self._stop, cap=10.0)
        while not self._stop.is_set():
            conn: Any = None
            try:
                conn = pg_connect(self.url)
                conn.execute(_sql("pg_listen"))  # db.PostgresDatabase.CHANNEL (tested)
                self.connections += 1
                if self.on_connect is not None:
                    self.on_connect()  # what was committed while no one listened
                self.ready.set()
                backoff.reset()
                while not self._stop.is_set():
                    self._listen(conn)
            except StoreError as exc:
                log.warning("store listener: %s", exc)
            except Exception as exc:  # psycopg.Error: reconnect; events in between are missed
                log.warning("store listener lost its connection to %s: %s",
                            redact(self.url), exc)
            finally:
                self.ready.clear()
                if conn is not None:
                    try:
                        conn.close()
                    except Exception as exc:  # already broken
                        log.debug("closing the listener connection: %s", exc)
            if self._stop.is_set() or backoff.wait():
                break
        self._close_reader()

    def read(self, after: int, through: int) -> list[tuple[int, JSONObject]]:
        """The logged events with after < id <= through, oldest first, read on the
        listener's own second connection (never waiting for the store's lock)."""
        try:
            if self._reader is None or self._reader.closed or self._reader.broken:
                self._close_reader()
                self._reader = pg_connect(self.url)
            rows = self._reader.execute(_sql("events_after"), (after, through, 1000)).fetchall()
        except Exception:
            self._close_reader()
            raise
        self.rows_read += len(rows)
        return [(int(r[0]), json.loads(r[1])) for r in rows]

    def latest(self) -> int:
        """The highest event id committed."""
        if self._reader is None or self._reader.closed or self._reader.broken:
            self._close_reader()
            self._reader = pg_connect(self.url)
        row = self._reader.execute(_sql("meta_value"), ("event_seq",)).fetchone()
        return int(row[0]) if row is not None else 0

    def _close_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            try:
                reader.close()
            except Exception as exc:  # already broken
                log.debug("closing the listener's reader: %s", exc)

    def _listen(self, conn: Any) -> None:
        """Wait (half a second at most) for notifications; deliver every one that came
        meanwhile as one: the ranges merged, the log read once for all of them. The
        ones that arrive while that is delivered make the next one."""
        first: JSONObject | None = None
        for note in conn.notifies(timeout=0.5, stop_after=1):
            first = self._merge(first, note.payload)
        if first is None:
            return
        pending = first
        for note in conn.notifies(timeout=0.0):  # whatever else is here already
            pending = self._merge(pending, note.payload) or pending
        self.notes_delivered += 1
        try:
            self.deliver(pending)
        except Exception:  # one bad notification must not end the listener
            log.exception("store listener: cannot deliver a notification")

    def _merge(self, pending: JSONObject | None, payload: str) -> JSONObject | None:
        """`pending` with the notification `payload` added: the lowest `a`, the highest
        `b`. Ours are left out (our own hub had them first)."""
        self.notes_heard += 1
        try:
            message = json.loads(payload)
        except ValueError:
            log.warning("store listener: ignored a notification that is not JSON")
            return pending
        if not isinstance(message, dict) or message.get("o") == self.origin:
            return pending
        if pending is None:
            return message
        merged = {**pending, **message}
        for key, pick in (("a", min), ("b", max)):
            ids = [m[key] for m in (pending, message) if _is_id(m.get(key))]
            if ids:
                merged[key] = pick(ids)
        return merged


def _is_id(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def relay(hub: EventHub, message: JSONObject, read: ReadLog) -> None:
    """Another instance committed the events `a`..`b`: hand them (and any before them
    this hub has not handed out) to its readers, read from the log, not logged again."""
    through = message.get("b")
    if _is_id(through):
        hub.catch_up(through, read)
