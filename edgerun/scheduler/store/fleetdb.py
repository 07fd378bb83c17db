"""The store queries of fleet operations (pacing, liveness, retries, rollouts, graph jobs).

Named queries (`fleet_*`, `rollout_*` in the store's sql/ files, one per back end)
through the store's public transactions (`Store.transaction` / `Store.read`), so
they run on every back end the store has and join the caller's open transaction
(group commit, store/tx.py).
State changes of tasks still go through the store's state machine
(`mark_lost`, `cancel_queued`, `add_task`); these only read, and set the
columns a state change does not cover (`hold`, `not_before`, attempts, rollouts).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from edgerun.protocol import JSONObject, format_time
from edgerun.protocol.messages import Error
from edgerun.scheduler.store.records import FINAL, FleetTaskRow
from edgerun.scheduler.store.tasks import Store

OUTSTANDING = ["dispatched", "accepted", "running"]
# hold of a task claimed for sending: `sending:{instance}`; `not_before` is when the claim
# lapses unless its instance, alive, keeps renewing it
SENDING = "sending"
SENDING_LIKE = "sending%"
FLEET_COLUMNS = ("hold", "not_before", "attempt", "parent_id", "root_id", "retry", "rollout_id")


@dataclass(frozen=True, slots=True)
class AttemptState:
    """What a rollout's progress needs of one attempt of a target (light enough to read
    after each end in a rollout of thousands of nodes)."""

    node: str
    id: str
    state: str
    hold: str | None
    """Only while queued."""
    not_before: float | None
    attempt: int
    error: Error | None
    retry: JSONObject | None

    def to_json(self) -> JSONObject:
        return {"node": self.node, "id": self.id, "state": self.state, "hold": self.hold,
                "not_before": self.not_before, "attempt": self.attempt,
                "error": self.error.to_dict() if self.error is not None else None,
                "retry": self.retry}


class FleetDB:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.waiting: set[str] = set()
        """The nodes the last claim left ready tasks behind on (no room for them)."""

    # --- reads ---------------------------------------------------------------------------
    def task(self, node: str, task_id: str) -> FleetTaskRow | None:
        with self.store.read() as db:
            row = db.one("get_task", (node, task_id))
            return FleetTaskRow.from_row(row) if row is not None else None

    def outstanding(self, node: str, now: float) -> int:
        """Tasks the node holds or is about to: dispatched, accepted, running, or claimed
        for sending (by any instance) and not yet confirmed by the broker."""
        with self.store.read() as db:
            return self._outstanding(db, node, now)

    @staticmethod
    def _outstanding(db: Any, node: str, now: float) -> int:
        row = db.one("fleet_outstanding", (node, OUTSTANDING, SENDING_LIKE, now))
        return int(row[0])

    def claim(self, node: str, pace: int, now: float, ttl: float,
              owner: str = "") -> list[FleetTaskRow]:
        """Up to `pace` minus what is outstanding of the node's free queued tasks, oldest
        first, marked as being sent (hold `sending` until now + ttl: a claim whose
        instance died before the broker took the task lapses, and the task is free
        again). One transaction, the node's row locked: several instances never
        claim the same task, nor more than `pace` together."""
        self.waiting = set()
        with self.store.transaction() as tx:
            db = tx.db
            if db.one("fleet_has_queued", (node,)) is None:
                return []  # the usual case after a task ends: nothing waits
            db.run("lock_node", (node,))
            room = pace - self._outstanding(db, node, now)
            if room <= 0:
                self.waiting = {node}
                return []
            rows = db.all("fleet_ready_on_node", (SENDING_LIKE, now, now, node, room + 1))
            if len(rows) > room:
                self.waiting = {node}
                rows = rows[:room]
            for row in rows:
                db.run("fleet_claim", (f"{SENDING}:{owner}", now + ttl, node, row["id"]))
            return [FleetTaskRow.from_row(r) for r in rows]

    def claim_many(self, nodes: list[str], pace: int, now: float, ttl: float,
                   owner: str = "") -> list[FleetTaskRow]:
        """`claim` for many nodes in a few statements per 500 nodes instead of four round
        trips per node: the nodes' rows locked (in node order: two instances never
        deadlock on them), their outstanding counted in one grouped read, their free
        queued tasks read in one, the claimed ones marked in one UPDATE."""
        out: list[FleetTaskRow] = []
        self.waiting = set()
        hold = f"{SENDING}:{owner}"
        for start in range(0, len(nodes), 500):
            part = sorted(set(nodes[start:start + 500]))
            with self.store.transaction() as tx:
                db = tx.db
                ready = db.all("fleet_ready_on_nodes", (SENDING_LIKE, now, now, part))
                if not ready:
                    continue
                waiting = sorted({r["node"] for r in ready})
                db.run("lock_nodes", (waiting,))
                busy = {r[0]: int(r[1]) for r in db.all(
                    "fleet_outstanding_by_node", (waiting, OUTSTANDING, SENDING_LIKE, now))}
                # read again now that the nodes are locked: another instance may have
                # claimed some meanwhile
                ready = db.all("fleet_ready_on_nodes", (SENDING_LIKE, now, now, waiting))
                room = {n: pace - busy.get(n, 0) for n in waiting}
                claimed = []
                for row in ready:
                    if room[row["node"]] > 0:
                        room[row["node"]] -= 1
                        claimed.append(row)
                    else:
                        self.waiting.add(row["node"])
                if not claimed:
                    continue
                seqs = [int(r["seq"]) for r in claimed]
                db.run("fleet_claim_seqs", (hold, now + ttl, seqs))
                out.extend(FleetTaskRow.from_row(r) for r in claimed)
        return out

    def nodes_with_ready(self, now: float, pace: int) -> list[str]:
        """Nodes with a task free to go and room for it (fewer than `pace` outstanding):
        one read, so that a tick over thousands of paced nodes writes nothing."""
        with self.store.read() as db:
            rows = db.all("fleet_nodes_with_ready", (SENDING_LIKE, now, now, OUTSTANDING,
                                                     SENDING_LIKE, now, pace))
            return [r[0] for r in rows]

    def next_not_before(self) -> float | None:
        with self.store.read() as db:
            row = db.one("fleet_next_not_before")
            return float(row[0]) if row is not None and row[0] is not None else None

    def in_flight(self, node: str) -> list[FleetTaskRow]:
        with self.store.read() as db:
            rows = db.all("fleet_in_flight", (node, OUTSTANDING))
            return [FleetTaskRow.from_row(r) for r in rows]

    def stranded(self, offline_before: str) -> list[FleetTaskRow]:
        """Tasks on nodes offline since before `offline_before` (RFC 3339): accepted or
        running ones, and a rollout's dispatched ones (a rollout must not wait for them)."""
        with self.store.read() as db:
            rows = db.all("fleet_stranded", (offline_before,))
            return [FleetTaskRow.from_row(r) for r in rows]

    def expired_queued(self, now_text: str) -> list[FleetTaskRow]:
        """Queued tasks whose expires_at passed while the scheduler held them."""
        with self.store.read() as db:
            rows = db.all("fleet_expired_queued", (now_text,))
            return [FleetTaskRow.from_row(r) for r in rows]

    def attempts(self, node: str, root: str) -> list[FleetTaskRow]:
        with self.store.read() as db:
            rows = db.all("fleet_attempts", (node, root, root))
            return [FleetTaskRow.from_row(r) for r in rows]

    def rollout_states(self, rollout_id: str) -> list[AttemptState]:
        """Every attempt of a rollout's targets, only what its progress needs: light
        enough to read after each end in a rollout of thousands of nodes."""
        policies: dict[str, Any] = {}
        with self.store.read() as db:
            rows = db.all("fleet_rollout_states", (rollout_id,))
        out = []
        for r in rows:
            raw = r["retry"]
            if raw and raw not in policies:
                policies[raw] = json.loads(raw)
            out.append(AttemptState(
                node=r["node"], id=r["id"], state=r["state"],
                hold=r["hold"] if r["state"] == "queued" else None,
                not_before=r["not_before"], attempt=r["attempt"] or 1,
                error=Error(r["error_code"], r["error_message"]) if r["error_code"] else None,
                retry=policies.get(raw) if raw else None))
        return out

    def rollout_tasks(self, rollout_id: str) -> list[FleetTaskRow]:
        with self.store.read() as db:
            rows = db.all("fleet_rollout_tasks", (rollout_id,))
            return [FleetTaskRow.from_row(r) for r in rows]

    def job_unsucceeded(self, job_id: str, task_ids: list[str]) -> int:
        """How many tasks of these steps of a job have not (yet) succeeded."""
        if not task_ids:
            return 0
        with self.store.read() as db:
            row = db.one("fleet_job_unsucceeded", (job_id, list(task_ids)))
            return int(row[0])

    def job_release(self, job_id: str, task_id: str) -> list[str]:
        """Lift the hold of one step of a job on all its nodes; the nodes it was lifted on."""
        with self.store.transaction() as tx:
            rows = tx.db.all("fleet_job_held", (job_id, task_id))
            tx.db.run("fleet_job_release", (job_id, task_id))
            return [r[0] for r in rows]

    def job_queued(self, job_id: str, task_id: str) -> list[tuple[str, str]]:
        """One step's tasks still queued: their (node, id)."""
        with self.store.read() as db:
            rows = db.all("fleet_job_queued", (job_id, task_id))
            return [(r["node"], r["id"]) for r in rows]

    # --- writes ----------------------------------------------------------------------------
    def set_fleet(self, node: str, task_id: str, **columns: Any) -> None:
        """Set fleet columns of one task (hold, not_before, attempt, parent_id, root_id,
        retry, rollout_id)."""
        assert set(columns) <= set(FLEET_COLUMNS), columns
        if not columns:
            return
        args: dict[str, Any] = {"node": node, "id": task_id}
        for name in FLEET_COLUMNS:
            value = columns.get(name)
            args[f"set_{name}"] = name in columns
            args[name] = json.dumps(value) if name == "retry" and value is not None else value
        with self.store.transaction() as tx:
            tx.db.run("fleet_set_task", args)

    def drop_claims(self) -> None:
        """Free every task claimed for sending and still queued (a single service's start:
        nothing else can be sending them)."""
        with self.store.transaction() as tx:
            tx.db.run("fleet_drop_claims", (SENDING_LIKE,))

    def renew_claims(self, owner: str, until: float, seqs: list[int]) -> None:
        """This instance is alive: its claims (the rows `seqs`, still queued and held by
        it) hold until `until` (from the ticker's own thread, so that a busy worker never
        lets them lapse). By primary key: no scan of the queued tasks, whose index fills
        with dead entries under a fan-out on PostgreSQL; nothing at all when none."""
        for start in range(0, len(seqs), 500):
            part = seqs[start:start + 500]
            with self.store.transaction() as tx:
                tx.db.run("fleet_renew_claims", (until, part, f"{SENDING}:{owner}"))

    def release(self, node: str, task_id: str) -> None:
        """Lift a queued task's hold: it may go (subject to pacing)."""
        with self.store.transaction() as tx:
            tx.db.run("fleet_release", (node, task_id))

    # --- rollouts --------------------------------------------------------------------------
    def release_in_window(self, rollout_id: str, node: str, task_id: str,
                          batch: int | None, interval: float | None, now: float) -> bool:
        """Start one target of a rollout if the window and the rate allow it now: one
        transaction with the rollout's row locked, so that several instances never start
        more than `batch` at once nor two within `interval` seconds."""
        with self.store.transaction() as tx:
            db = tx.db
            row = db.one("lock_rollout", (rollout_id,))
            if row is None or row["state"] != "running":
                return False
            if interval is not None and row["released_at"] is not None and \
                    now < float(row["released_at"]) + interval:
                return False
            if batch is not None:
                active = db.one("rollout_active", (rollout_id, list(FINAL)))
                if int(active[0]) >= batch:
                    return False
            if db.run("rollout_release_task", (node, task_id)).rowcount != 1:
                return False
            db.run("rollout_set_released", (now, rollout_id))
            return True

    def add_rollout(self, rollout_id: str, task_id: str, options: JSONObject,
                    nodes: list[str]) -> None:
        now = format_time()
        with self.store.transaction() as tx:
            tx.db.run("insert_rollout", (rollout_id, task_id, now, now, "running",
                                         json.dumps(options), json.dumps(nodes)))

    def rollout(self, rollout_id: str) -> JSONObject | None:
        with self.store.read() as db:
            row = db.one("get_rollout", (rollout_id,))
            return _rollout_dict(row) if row is not None else None

    def rollouts(self, state: str | None = None, limit: int = 100) -> list[JSONObject]:
        with self.store.read() as db:
            rows = db.all("list_rollouts", {"state": state, "limit": limit})
            return [_rollout_dict(r) for r in rows]

    def set_rollout(self, rollout_id: str, *, state: str | None = None,
                    reason: str | None = None, released_at: float | None = None,
                    expect: tuple[str, ...] | None = None) -> bool:
        """Change a rollout; with `expect`, only while it is in one of those states."""
        args = {"now": format_time(), "state": state, "reason": reason,
                "released_at": released_at, "id": rollout_id,
                "expect": list(expect) if expect else None}
        with self.store.transaction() as tx:
            return bool(tx.db.run("set_rollout", args).rowcount > 0)


def _rollout_dict(row: Any) -> JSONObject:
    return {"id": row["id"], "task_id": row["task_id"], "created_at": row["created_at"],
            "updated_at": row["updated_at"], "state": row["state"], "reason": row["reason"],
            "options": json.loads(row["options"]), "nodes": json.loads(row["nodes"]),
            "released_at": row["released_at"]}
