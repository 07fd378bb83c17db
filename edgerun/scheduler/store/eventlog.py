"""The event log in the store: what /v1/events resumes from, logged with the transaction
that made each event (store/tx.py), announced to the hub once that has committed."""

from __future__ import annotations

import json

from edgerun.protocol import JSONObject
from edgerun.scheduler.store.parts import StoreParts
from edgerun.scheduler.store.tx import Tx

TOP_SEQ = 2**62  # above every seq: a page with no cursor


class EventLogStore(StoreParts):
    def event(self, event_id: int) -> JSONObject | None:
        """One logged event's body (None once retention dropped it)."""
        with self.read() as db:
            row = db.one("event_body", (event_id,))
            return json.loads(row["body"]) if row is not None else None

    def log_event(self, channel: str | None, event: JSONObject) -> None:
        """Log an event with the open transaction (one of its own when none is open):
        it gets its id, and reaches the hub, when that commits. Channel None: a live-only
        event (output), not logged, handed out after the commit in its place."""
        node, task_id = event.get("node"), event.get("id")
        with self.transaction() as tx:
            tx.events.append((channel, node if isinstance(node, str) else None,
                              task_id if isinstance(task_id, str) else None, event))

    def append_event(self, channel: str, node: str | None, task_id: str | None,
                     body: JSONObject, keep: int) -> int:
        """Log one event in a transaction of its own; its id (0 when it joined an open
        transaction: the id is given at its commit). Keeps the newest `keep` events;
        the highest id dropped is remembered so a reader asking for older ones can be
        told (`events_dropped_through`)."""
        with self.transaction() as tx:
            tx.events.append((channel, node, task_id, body))
            tx.keep = keep
        return tx.logged[-1][0] if tx.logged else 0

    def hold_live(self, event: JSONObject) -> bool:
        """Hold a live-only event until the open transaction commits, so that it reaches
        readers after the events logged before it (False: no transaction is open)."""
        tx: Tx | None = getattr(self._local, "tx", None)
        if tx is None:
            return False
        tx.events.append((None, None, None, event))
        return True

    def events_after(self, after: int, limit: int = 1000,
                     through: int | None = None) -> list[tuple[int, JSONObject]]:
        """(id, body) of logged events with id > `after` (and <= `through`), oldest first."""
        with self.read() as db:
            rows = db.all("events_after",
                          (after, through if through is not None else TOP_SEQ, limit))
            return [(int(r["id"]), json.loads(r["body"])) for r in rows]

    def event_horizon(self) -> tuple[int, int]:
        """(highest id dropped by retention, highest id written); 0 when none."""
        with self.read() as db:
            row = db.one("meta_value", ("events_dropped_through",))
            last = db.one("meta_value", ("event_seq",))
            return (int(row["value"]) if row else 0, int(last[0]) if last else 0)
