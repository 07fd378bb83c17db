"""Running jobs: the steps of a job stored per node (held until their turn), released
as their needs succeed and canceled with the reason when one fails. What a job file is,
an ordered list or a graph of named steps with `needs`, and its checks: control/jobfile.py.
The steps live in the store, so a restarted service resumes where each node was.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from collections.abc import Callable, Sequence
from typing import Any

from edgerun.control.errors import BadRequest, Conflict
from edgerun.control.jobfile import GRAPH_KEYS, dependents, graph_of
from edgerun.protocol import JSONObject, Task, is_task_id
from edgerun.scheduler.core import Core
from edgerun.scheduler.fleet.pacing import Fleet
from edgerun.scheduler.store.records import FINAL, JobRow, TaskRow


# --- progress: counted over the job's real tasks ----------------------------------------------
def progress_of(counts: dict[int, dict[str, int]], steps: int, nodes: int) -> JSONObject:
    """One row for the whole job from the database's {step: {state: count}}: per step and in
    total. `tasks` is the number of task rows the job has, not nodes x steps: in a graph
    every step has its own targets (5 tasks over 12 node-step pairs read 5/5 at the end)."""
    per_step = []
    total: dict[str, int] = {}
    for i in range(steps):
        by_state = counts.get(i, {})
        size = sum(by_state.values())
        per_step.append({"step": i, "states": by_state, "tasks": size,
                         "done": sum(n for s, n in by_state.items() if s in FINAL)})
        for state, n in by_state.items():
            total[state] = total.get(state, 0) + n
    done = sum(n for s, n in total.items() if s in FINAL)
    failed = sum(n for s, n in total.items() if s in FINAL and s != "succeeded")
    return {"nodes": nodes, "tasks": sum(total.values()), "done": done, "failed": failed,
            "succeeded": total.get("succeeded", 0), "states": total, "steps": per_step}


# --- running jobs ---------------------------------------------------------------------------
class JobRunner:
    """Creates jobs and moves them on as their steps end (on the worker thread)."""

    def __init__(self, core: Core, fleet: Fleet) -> None:
        self.core, self.fleet, self.db = core, fleet, fleet.db
        self._graphs: dict[str, dict[str, list[str]] | None] = {}
        self._sizes: dict[str, int] = {}  # steps a job has (known with its graph)

    def create(self, targets: Sequence[str], online: bool, steps: Sequence[Any],
               job_id: str | None = None, *, where: Any = None, creator: str | None = None,
               announce: Callable[[JobRow], None] | None = None) -> JobRow:
        """Store the job, its tasks and their events in one transaction, with who created
        it; `announce(job)` runs inside it (the API's audit record commits with the job).
        Its tasks are sent by the worker after the commit."""
        if not steps:
            raise BadRequest("a job needs at least one step")
        job_id = job_id or str(uuid.uuid4())
        if not is_task_id(f"{job_id}.0") or len(job_id) > 100:
            raise BadRequest(f"{job_id!r} is not a usable job id "
                             f"(up to 100 of A-Z a-z 0-9 _ . : -)")
        if not all(isinstance(s, dict) for s in steps):
            raise BadRequest("every step must be an object (a task)")
        graph = graph_of(steps)
        plan: list[tuple[JSONObject, Task, list[str]]] = []
        if graph is None:
            nodes = self.core.resolve(targets, online, where)
            for i, step in enumerate(steps):
                task = self.core.build_task(step, f"{job_id}.{i}", expiry="expires_at" in step)
                plan.append((dict(step), task, nodes))
        else:
            for step in steps:
                spec = {k: v for k, v in step.items() if k not in GRAPH_KEYS}
                own = "targets" in step or "where" in step
                step_targets = step.get("targets", [] if "where" in step else targets)
                if not isinstance(step_targets, list):
                    raise BadRequest(f"step {step['name']!r}: `targets` must be a list")
                step_nodes = self.core.resolve(
                    step_targets, bool(step.get("online", online)),
                    step.get("where") if own else where)
                task = self.core.build_task(spec, f"{job_id}.{step['name']}",
                                           expiry="expires_at" in spec)
                plan.append((dict(step), task, step_nodes))
        self.core.require_broker()
        all_nodes = list(dict.fromkeys(n for _, _, ns in plan for n in ns))

        def create() -> JobRow:
            store = self.core.store
            made: list[TaskRow] = []
            # one transaction: the job, every step's tasks and their events, or nothing
            with store.transaction():
                if store.job_head(job_id) is not None:
                    raise Conflict(f"job {job_id} already exists")
                stored = []
                for (step, task, step_nodes) in plan:
                    extra = {k: step[k] for k in GRAPH_KEYS if k in step}
                    if graph is not None:
                        extra["nodes"] = step_nodes
                    stored.append({**task.to_dict(), **extra})
                store.add_job(job_id, all_nodes, stored, creator)
                for i, (step, task, step_nodes) in enumerate(plan):
                    held = bool(step.get("needs")) if graph is not None else i > 0
                    # a step's tasks on every node in a few multi-row statements (issue 22)
                    for change in store.add_tasks(
                            list(dict.fromkeys(step_nodes)), task, source="job",
                            job_id=job_id, step=i, hold="job" if held else None):
                        self.core.emit(change)
                        made.append(change.task)
                head = store.job_head(job_id)
                assert head is not None
                job = replace(head, tasks=made)
                if announce is not None:
                    announce(job)
                # sent by the worker once committed, as a dispatch's are: the answer does
                # not wait for 1,000 sends
                store.after_commit(lambda: self.core.submit(
                    lambda: self.fleet.pump_nodes(all_nodes)))
            self._graphs[job_id] = graph
            self._sizes[job_id] = len(plan)
            return job
        return self.core.call(create)

    def graph(self, job_id: str) -> dict[str, list[str]] | None:
        if job_id not in self._graphs:
            job = self.core.store.job_head(job_id)  # not its 10,000 tasks
            self._graphs[job_id] = graph_of(job.steps) if job else None
            self._sizes[job_id] = len(job.steps) if job else 0
        return self._graphs[job_id]

    # --- the fleet's rounds (fleet/pacing.py's Extension) ------------------------------------
    def on_final(self, task: TaskRow) -> None:
        if task.job:
            self.advance(task)

    def tick(self) -> None:
        """Jobs move on only as their steps end."""

    def restart(self) -> None:
        """Held steps wait in the store; the fleet's pump sends what is free."""

    def advance(self, task: TaskRow) -> None:
        """A job step ended: free what may go now, cancel what never will."""
        assert task.job is not None
        graph = self.graph(task.job)
        if graph is None:
            self._advance_list(task)
        else:
            self._advance_graph(task, graph)

    def _advance_list(self, task: TaskRow) -> None:
        assert task.job is not None and task.step is not None
        if task.step + 1 >= self._sizes.get(task.job, 1 << 30):
            return  # the last step (a one-step job: `edgerun run`): nothing comes after it
        steps = self.core.store.job_steps(task.job, task.node)
        later = [s for s in steps
                 if s.step is not None and s.step > task.step and s.state == "queued"]
        if not later:
            return
        if task.state == "succeeded":
            self.db.release(task.node, later[0].id)
            self.fleet.pump(task.node)
            return
        why = (f"step {task.step + 1} of job {task.job} ended {task.state} on node "
               f"{task.node}, so its later steps are not run")
        for step in later:
            self.fleet.cancel_queued(step.node, step.id, why)

    def _advance_graph(self, task: TaskRow, graph: dict[str, list[str]]) -> None:
        job = task.job
        assert job is not None
        name = task.id[len(job) + 1:]
        if task.state != "succeeded":
            why = (f"step {name!r} of job {job} ended {task.state} on node "
                   f"{task.node}, so the steps that need it are not run")
            for step in sorted(dependents(graph, name)):
                for node, task_id in self.db.job_queued(job, f"{job}.{step}"):
                    self.fleet.cancel_queued(node, task_id, why)
            return
        for step, wanted in graph.items():
            if name not in wanted:
                continue
            if self.db.job_unsucceeded(job, [f"{job}.{w}" for w in wanted]) == 0:
                for node in self.db.job_release(job, f"{job}.{step}"):
                    self.fleet.pump(node)
