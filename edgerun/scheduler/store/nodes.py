"""The node registry: what each node's status messages said, and when it was last heard."""

from __future__ import annotations

import time

from edgerun.protocol import Status, format_time, is_node_id
from edgerun.scheduler.store.parts import StoreParts, json_or_none
from edgerun.scheduler.store.records import NodeRow

TOUCH_EVERY_S = 1.0


class NodeRegistry(StoreParts):
    def apply_status(self, status: Status) -> tuple[str | None, NodeRow]:
        """Record a status message; returns (previous state or None, the node).

        The row is created first (a no-op when it exists) and then read FOR UPDATE,
        so two instances recording the same status agree on one `previous`."""
        now = format_time()
        with self.transaction() as db:
            db.run("insert_node_placeholder", (status.node, "__new__", now, now, now))
            row = db.one("lock_node_state", (status.node,))
            previous = None if row["state"] == "__new__" else row["state"]
            db.run("update_node_status",
                   (status.state, now, status.state, now, status.agent,
                    json_or_none(status.facts),
                    json_or_none(list(status.running)) if status.running is not None
                    else None, status.node))
            node = NodeRow.from_row(db.one("get_node", (status.node,)))
            return previous, node

    def touch_node(self, node: str) -> None:
        """Any message from a node shows it alive: refresh `last_seen` of a known node.
        At most once a second per node: a burst of updates costs one write, not one each
        (a commit is a disk flush on PostgreSQL)."""
        now = time.monotonic()
        if now - self._touched.get(node, -TOUCH_EVERY_S) < TOUCH_EVERY_S:
            return
        if len(self._touched) > 100_000:
            self._touched.clear()
        self._touched[node] = now
        with self.transaction() as tx:
            tx.touched.add(node)

    def nodes(self) -> list[NodeRow]:
        with self.read() as db:
            return [NodeRow.from_row(r) for r in db.all("list_nodes")]

    def node_page(self, *, state: str | None, after: str | None,
                  limit: int) -> tuple[list[NodeRow], int]:
        """(up to `limit` nodes after `after` in id order, in `state` if given; how many
        there are in all): a page read by the primary key, not the whole registry."""
        with self.read() as db:
            rows = db.all("node_page", {"state": state, "after": after or "", "limit": limit})
            total = db.one("count_nodes", {"state": state})[0]
        return [NodeRow.from_row(r) for r in rows], int(total)

    def node(self, node: str) -> NodeRow | None:
        with self.read() as db:
            row = db.one("get_node", (node,))
            return NodeRow.from_row(row) if row is not None else None

    def node_states(self, prefix: str = "") -> list[tuple[str, str]]:
        """(id, state) of the nodes whose id starts with `prefix`, in id order: a range of
        the primary key, no facts read or parsed (globs and pages resolve on it)."""
        if prefix and not is_node_id(prefix):
            return []  # (a NUL byte would be an error on PostgreSQL, not a miss)
        with self.read() as db:
            rows = db.all("node_states_in_range", (prefix, prefix + "\U0010ffff"))
            return [(str(r["node"]), str(r["state"])) for r in rows]

    def nodes_by_ids(self, ids: list[str]) -> list[NodeRow]:
        """The known nodes among `ids`, in id order, a few statements for many."""
        out: list[NodeRow] = []
        ids = sorted({i for i in ids if is_node_id(i)})  # batches in id order too
        with self.read() as db:
            for start in range(0, len(ids), 500):
                out.extend(NodeRow.from_row(r) for r in db.all("nodes_by_ids",
                                                               (ids[start:start + 500],)))
        return out

    def node_states_of(self, ids: list[str]) -> list[tuple[str, str]]:
        """(id, state) of the known nodes among `ids`: rows read, no facts parsed."""
        out: list[tuple[str, str]] = []
        ids = sorted({i for i in ids if is_node_id(i)})
        with self.read() as db:
            for start in range(0, len(ids), 500):
                out.extend((str(r["node"]), str(r["state"])) for r in db.all(
                    "node_states_by_ids", (ids[start:start + 500],)))
        return out

    def node_ids_with_prefix(self, prefix: str, limit: int = 10) -> list[str]:
        """Node ids that start with `prefix`, in order (for git-like short ids)."""
        if not is_node_id(prefix):
            return []
        with self.read() as db:
            rows = db.all("node_ids_in_range", (prefix, prefix + "\U0010ffff", limit))
            return [str(r["node"]) for r in rows]

    def count_nodes_by_state(self) -> dict[str, int]:
        with self.read() as db:
            rows = db.all("count_nodes_by_state")
            return {r["state"]: int(r["n"]) for r in rows}

    def online_nodes(self) -> set[str]:
        with self.read() as db:
            return {r["node"] for r in db.all("online_nodes")}

    def forget_node(self, node: str) -> bool:
        """Remove a node from the registry (its task history stays until pruned).
        False when it was not known. A node still alive comes back with its next status."""
        with self.transaction() as db:
            return bool(db.run("delete_node", (node,)).rowcount)
