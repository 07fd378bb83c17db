"""One transaction per change, and many changes per transaction.

`Store.transaction()` opens a `Tx` on the calling thread; every store method
called on that thread while it is open joins it instead of committing on its
own. So a change and its event commit together (the event log rows are written
by `flush_events` at the end of the transaction, just before COMMIT), and the
worker records everything that arrived together in one commit (core.py).

What must not happen before the commit waits in `Tx.after` (acks to the broker,
sends, answers to API calls, the other instances' notifications are sent by
PostgreSQL itself at COMMIT); a rolled-back transaction drops them all.

Event ids come from one counter row (`meta.event_seq`), bumped by the number of
events as the transaction's last statement. On PostgreSQL that row stays locked
until COMMIT, so a second transaction with events waits for the first to end
before it takes its ids: ids are handed out in commit order across every
instance, with no holes (a rollback gives its ids back). A reader that has seen
id N and reads the log after N never misses a committed event and never gets one
twice; a hub that receives id N+2 knows N+1 is committed already and reads it
from the log (events.py). Holding the row from the last statement to COMMIT
costs one commit's time per transaction, shared by all its events: the reason
group commit goes with it. The alternative, reading only up to a "safe horizon"
of transactions still open, needs snapshot bookkeeping on every reader and still
leaves ids out of commit order for live readers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgerun.protocol import JSONObject, format_time
from edgerun.scheduler.store.db import Cursor, Database
from edgerun.scheduler.store.queries import Args

log = logging.getLogger(__name__)

RETENTION_EVERY = 500  # prune the log when its ids cross a multiple of this


@dataclass(eq=False)
class Tx:
    """The open transaction of one thread."""

    db: Database
    events: list[tuple[str | None, str | None, str | None, JSONObject]] = field(
        default_factory=list)
    """(channel, node, task id, event) to log when the transaction ends; channel None: a
    live-only event (output), handed out after the commit in its place, not logged."""
    logged: list[tuple[int, JSONObject]] = field(default_factory=list)
    """(id, event) of those, once written (id 0: live only)."""
    keep: int | None = None
    """How many events the log keeps (the store's default when None)."""
    after: list[Callable[[], None]] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)
    """Nodes whose last_seen to refresh in one statement at the end."""
    before: list[Callable[[], None]] = field(default_factory=list)
    """Run at the end of the transaction, before its events are written and it commits
    (work gathered over the transaction and done in one go; may add more)."""
    scratch: dict[str, Any] = field(default_factory=dict)
    """What such work gathers, for this transaction only (a rollback forgets it)."""

    def run(self, name: str, args: Args = ()) -> Cursor:
        """A named query (db.py), in this transaction."""
        return self.db.run(name, args)

    def one(self, name: str, args: Args = ()) -> Any:
        return self.db.one(name, args)

    def all(self, name: str, args: Args = ()) -> list[Any]:
        return self.db.all(name, args)

    def before_commit(self, callback: Callable[[], None]) -> None:
        self.before.append(callback)

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run `callback` once this transaction has committed (never if it rolls back)."""
        self.after.append(callback)


def flush_events(tx: Tx, *, origin: str, shared: bool,
                 keep: int) -> list[tuple[int, JSONObject]]:
    """Write the transaction's events to the log with ids from the counter (the last
    statements before COMMIT); NOTIFY the other instances of the range (PostgreSQL)."""
    db = tx.db
    events = [e for e in tx.events if e[0] is not None]
    if not events:
        tx.logged = [(0, event) for *_where, event in tx.events]
        return tx.logged
    last = int(db.one("bump_event_seq", (len(events),))[0])
    first = last - len(events) + 1
    at = format_time()
    db.run_many("insert_events", [(first + i, at, channel, node, task_id, json.dumps(event))
                                  for i, (channel, node, task_id, event) in enumerate(events)])
    if shared:
        db.notify(json.dumps({"o": origin, "a": first, "b": last}, separators=(",", ":")))
    keep = tx.keep if tx.keep is not None else keep
    if keep > 0 and last > keep and (first - 1) // RETENTION_EVERY != last // RETENTION_EVERY:
        horizon = last - keep
        db.run("delete_events_through", (horizon,))
        db.run("set_meta", ("events_dropped_through", str(horizon)))
    ids = iter(range(first, last + 1))
    tx.logged = [(next(ids) if channel is not None else 0, event)
                 for channel, *_where, event in tx.events]
    return tx.logged


def run_after(callbacks: list[Callable[[], None]]) -> None:
    """Each callback once; one that fails is logged and the others still run."""
    for callback in callbacks:
        try:
            callback()
        except Exception:  # an ack or a send that fails must not stop the others
            log.exception("after commit")
