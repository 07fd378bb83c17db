"""Jobs in the store: their rows, their steps' tasks, and the job views' counts."""

from __future__ import annotations

import json

from edgerun.protocol import JSONObject, format_time
from edgerun.scheduler.store.parts import StoreParts
from edgerun.scheduler.store.records import JobRow, TaskRow


class JobReads(StoreParts):
    # --- jobs ------------------------------------------------------------------------
    def add_job(self, job_id: str, nodes: list[str], steps: list[JSONObject],
                created_by: str | None = None) -> None:
        with self.transaction() as db:
            db.run("insert_job", (job_id, format_time(), json.dumps(nodes), json.dumps(steps),
                                  created_by))

    def job(self, job_id: str) -> JobRow | None:
        """A job with every task of it."""
        with self.read() as db:
            row = db.one("get_job", (job_id,))
            if row is None:
                return None
            tasks = db.all("job_tasks", (job_id,))
            return JobRow.from_row(row, [TaskRow.from_row(t) for t in tasks])

    def job_head(self, job_id: str) -> JobRow | None:
        """A job's own row (its nodes and steps), without its tasks (`tasks` empty)."""
        with self.read() as db:
            row = db.one("get_job", (job_id,))
            return JobRow.from_row(row, []) if row is not None else None

    def job_steps(self, job_id: str, node: str) -> list[TaskRow]:
        with self.read() as db:
            rows = db.all("job_steps", (job_id, node))
            return [TaskRow.from_row(r) for r in rows]

    def queued_job_heads(self) -> list[TaskRow]:
        """Job steps that may go now: queued, and every earlier step of the node succeeded."""
        with self.read() as db:
            rows = db.all("queued_job_heads")
            return [TaskRow.from_row(r) for r in rows]

    def jobs(self, before: str | None = None, limit: int = 50) -> list[JSONObject]:
        """Newest first, created before the cursor `before` (a created_at): id, created_at,
        the number of nodes, the steps."""
        with self.read() as db:
            rows = db.all("list_jobs", (before or "9999", limit))
            return [{"id": r["id"], "created_at": r["created_at"],
                     "nodes": len(json.loads(r["nodes"])), "steps": json.loads(r["steps"])}
                    for r in rows]

    def job_progress(self, job_id: str) -> dict[int, dict[str, int]]:
        """{step: {state: count}} over every node of the job, counted by the database."""
        with self.read() as db:
            rows = db.all("job_progress", (job_id,))
            out: dict[int, dict[str, int]] = {}
            for r in rows:
                out.setdefault(int(r["step"]), {})[r["state"]] = int(r["n"])
            return out

    def job_targets(self, job_id: str, after: str | None = None,
                    limit: int = 100) -> list[JSONObject]:
        """One row per node, by node id after `after`: its steps' id, state, exit code."""
        with self.read() as db:
            nodes = [r["node"] for r in db.all("job_target_nodes",
                                               (job_id, after or "", limit))]
            if not nodes:
                return []
            rows = db.all("job_target_rows", (job_id, nodes))
            by_node: dict[str, list[JSONObject]] = {n: [] for n in nodes}
            for r in rows:
                by_node[r["node"]].append({"step": r["step"], "id": r["id"],
                                           "state": r["state"], "exit_code": r["exit_code"],
                                           "error": r["error_code"],
                                           "updated_at": r["updated_at"]})
            return [{"node": n, "steps": steps} for n, steps in by_node.items()]
