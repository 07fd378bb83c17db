"""Jobs: an ordered list of tasks per node (like RackHD's bootstrap lists), or a graph of
named steps with `needs` across nodes (like RackHD's task graphs).

An ordered list:

    targets = ["rack1-*"]          # optional; node ids, globs, MACs; NODE arguments override
    where = ["arch=x86_64"]        # optional; facts every target must have

    [[steps]]
    type = "shell"
    command = "ipmitool lan print"
    timeout = 60

    [[steps]]
    type = "download"
    url = "http://10.0.0.1/fw.bin"
    dest = "/tmp/fw.bin"

Each node runs the steps in order and goes on only when its previous step
succeeded; after a failure its remaining steps end `canceled`.

A graph: every step has a `name`; a step may list the steps it `needs`, and
may have `targets` / `where` / `online` of its own (else the job's):

    targets = ["rack1-*"]

    [[steps]]
    name = "inventory"
    type = "shell"
    command = "lshw -short"

    [[steps]]
    name = "report"
    needs = ["inventory"]
    targets = ["controller-1"]
    type = "shell"
    command = "collect-inventory"

A step starts on all its nodes once every step it needs has succeeded on every
node of that step; if one of them fails on any node, the steps that need it
(directly or not) end `canceled` and say why. Steps that need nothing start at
once. The task id of a graph step is `{job}.{name}`; of a list step `{job}.{i}`.

The service keeps the steps in its store (held until their turn), so a
restart resumes where each node was. A file ending in .json holds the same as
a JSON object.
"""

from __future__ import annotations

import json
import re
import tomllib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgerun.errors import ConfigError
from edgerun.protocol import JSONObject, Task, is_task_id

from .errors import BadRequest
from .fleetdb import Conflict
from .store import Change

if TYPE_CHECKING:
    from .fleet import Fleet

JOB_KEYS = ("targets", "where", "steps")
GRAPH_KEYS = ("name", "needs", "targets", "where", "online")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


@dataclass(frozen=True)
class JobFile:
    targets: list[str]
    where: list[str]
    steps: list[dict[str, Any]]


def load_job(path: str) -> tuple[list[str], list[dict[str, Any]]]:
    """(targets, steps) from a TOML or JSON job file; ConfigError on any mistake."""
    job = load_job_file(path)
    return job.targets, job.steps


def load_job_file(path: str) -> JobFile:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read job file {path}: {exc.strerror}") from None
    try:
        doc = json.loads(raw) if path.endswith(".json") else tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        kind = "JSON" if path.endswith(".json") else "TOML"
        raise ConfigError(f"job file {path} is not valid {kind}: {exc}") from None
    return parse_job_file(doc, path)


def parse_job(doc: Any, where: str = "job") -> tuple[list[str], list[dict[str, Any]]]:
    job = parse_job_file(doc, where)
    return job.targets, job.steps


def parse_job_file(doc: Any, where: str = "job") -> JobFile:
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: must be a table with `steps`")
    unknown = set(doc) - set(JOB_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key `{sorted(unknown)[0]}` "
                          f"(a job has `targets`, `where` and `steps`)")
    targets = doc.get("targets", [])
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ConfigError(f"{where}: `targets` must be a list of node ids or globs")
    facts = doc.get("where", [])
    if isinstance(facts, str):
        facts = [facts]
    if not isinstance(facts, list) or not all(isinstance(t, str) for t in facts):
        raise ConfigError(f"{where}: `where` must be a list of expressions such as "
                          f"\"arch=x86_64\"")
    steps = doc.get("steps")
    if not isinstance(steps, list) or not steps:
        raise ConfigError(f"{where}: `steps` must be a non-empty list of tasks ([[steps]])")
    for number, step in enumerate(steps, 1):
        if not isinstance(step, dict) or step.get("type") not in ("shell", "download"):
            raise ConfigError(f"{where}: step {number} needs `type` shell or download")
    try:
        graph_of(steps)
    except BadRequest as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return JobFile(targets, facts, steps)


# --- graphs -------------------------------------------------------------------------------
def is_graph(steps: Sequence[Any]) -> bool:
    return any(isinstance(s, dict) and any(k in s for k in GRAPH_KEYS) for s in steps)


def graph_of(steps: Sequence[Any]) -> dict[str, list[str]] | None:
    """name -> needs of a graph job (checked: unique names, known needs, no cycle);
    None for an ordered list. BadRequest naming the problem."""
    if not is_graph(steps):
        return None
    needs: dict[str, list[str]] = {}
    for number, step in enumerate(steps, 1):
        name = step.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise BadRequest(f"step {number}: a graph job (steps with `needs`, `targets` or "
                             f"`name`) needs a `name` for every step: 1-40 of A-Z a-z 0-9 "
                             f"_ -")
        if name in needs:
            raise BadRequest(f"step {number}: the name {name!r} is used twice")
        wanted = step.get("needs", [])
        if isinstance(wanted, str):
            wanted = [wanted]
        if not isinstance(wanted, list) or not all(isinstance(w, str) for w in wanted):
            raise BadRequest(f"step {name!r}: `needs` must be a list of step names")
        needs[name] = list(dict.fromkeys(wanted))
    for name, wanted in needs.items():
        for other in wanted:
            if other not in needs:
                raise BadRequest(f"step {name!r} needs {other!r}, which is not a step of "
                                 f"this job")
            if other == name:
                raise BadRequest(f"step {name!r} needs itself")
    _check_acyclic(needs)
    return needs


def _check_acyclic(needs: dict[str, list[str]]) -> None:
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = [*path[path.index(name):], name]
            raise BadRequest(f"the steps' needs form a cycle: {' -> '.join(cycle)}")
        state[name] = 1
        for other in needs[name]:
            visit(other, [*path, name])
        state[name] = 2
    for name in needs:
        visit(name, [])


def dependents(needs: dict[str, list[str]], name: str) -> set[str]:
    """Every step that needs `name`, directly or not."""
    out: set[str] = set()
    frontier = [name]
    while frontier:
        current = frontier.pop()
        for step, wanted in needs.items():
            if current in wanted and step not in out:
                out.add(step)
                frontier.append(step)
    return out


# --- running jobs ---------------------------------------------------------------------------
class JobRunner:
    """Creates jobs and moves them on as their steps end (on the worker thread)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet, self.svc, self.db = fleet, fleet.svc, fleet.db
        self._graphs: dict[str, dict[str, list[str]] | None] = {}

    def create(self, targets: Sequence[str], online: bool, steps: Sequence[Any],
               job_id: str | None = None, *, where: Any = None) -> JSONObject:
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
            nodes = self.svc.resolve(targets, online, where)
            for i, step in enumerate(steps):
                task = self.svc.build_task(step, f"{job_id}.{i}", expiry="expires_at" in step)
                plan.append((dict(step), task, nodes))
        else:
            for step in steps:
                spec = {k: v for k, v in step.items() if k not in GRAPH_KEYS}
                own = "targets" in step or "where" in step
                step_targets = step.get("targets", [] if "where" in step else targets)
                if not isinstance(step_targets, list):
                    raise BadRequest(f"step {step['name']!r}: `targets` must be a list")
                step_nodes = self.svc.resolve(
                    step_targets, bool(step.get("online", online)),
                    step.get("where") if own else where)
                task = self.svc.build_task(spec, f"{job_id}.{step['name']}",
                                           expiry="expires_at" in spec)
                plan.append((dict(step), task, step_nodes))
        self.svc.require_broker()
        all_nodes = list(dict.fromkeys(n for _, _, ns in plan for n in ns))

        def create() -> JSONObject:
            if self.svc.store.job(job_id) is not None:
                raise Conflict(f"job {job_id} already exists")
            stored = []
            for (step, task, step_nodes) in plan:
                extra = {k: step[k] for k in GRAPH_KEYS if k in step}
                if graph is not None:
                    extra["nodes"] = step_nodes
                stored.append({**task.to_dict(), **extra})
            self.svc.store.add_job(job_id, all_nodes, stored)
            self._graphs[job_id] = graph
            for i, (step, task, step_nodes) in enumerate(plan):
                held = bool(step.get("needs")) if graph is not None else i > 0
                for node in step_nodes:
                    if self.svc.store.add_task(node, task, source="job", job_id=job_id,
                                               step=i) is None:
                        continue
                    if held:
                        self.db.set_fleet(node, task.id, hold="job")
                    created = self.db.task(node, task.id)
                    assert created is not None
                    self.svc._emit(Change(None, created))
            for node in all_nodes:
                self.fleet.pump(node)
            job = self.svc.store.job(job_id)
            assert job is not None
            return job
        return self.fleet.call(create)

    def graph(self, job_id: str) -> dict[str, list[str]] | None:
        if job_id not in self._graphs:
            job = self.svc.store.job(job_id)
            self._graphs[job_id] = graph_of(job["steps"]) if job else None
        return self._graphs[job_id]

    def advance(self, task: JSONObject) -> None:
        """A job step ended: free what may go now, cancel what never will."""
        graph = self.graph(task["job"])
        if graph is None:
            self._advance_list(task)
        else:
            self._advance_graph(task, graph)

    def _advance_list(self, task: JSONObject) -> None:
        steps = self.svc.store.job_steps(task["job"], task["node"])
        later = [s for s in steps if s["step"] > task["step"] and s["state"] == "queued"]
        if not later:
            return
        if task["state"] == "succeeded":
            self.db.release(task["node"], later[0]["id"])
            self.fleet.pump(task["node"])
            return
        why = (f"step {task['step'] + 1} of job {task['job']} ended {task['state']} on node "
               f"{task['node']}, so its later steps are not run")
        for step in later:
            self.fleet.cancel_queued(step, why)

    def _advance_graph(self, task: JSONObject, graph: dict[str, list[str]]) -> None:
        job = task["job"]
        name = task["id"][len(job) + 1:]
        if task["state"] != "succeeded":
            why = (f"step {name!r} of job {job} ended {task['state']} on node "
                   f"{task['node']}, so the steps that need it are not run")
            for step in sorted(dependents(graph, name)):
                for row in self.db.job_queued(job, f"{job}.{step}"):
                    self.fleet.cancel_queued(row, why)
            return
        for step, wanted in graph.items():
            if name not in wanted:
                continue
            if self.db.job_unsucceeded(job, [f"{job}.{w}" for w in wanted]) == 0:
                for node in self.db.job_release(job, f"{job}.{step}"):
                    self.fleet.pump(node)

def step_ids(job_id: str, steps: Sequence[Any]) -> list[str]:
    """The task id of each step: `{job}.{name}` in a graph, `{job}.{i}` in a list."""
    if is_graph(steps):
        return [f"{job_id}.{step['name']}" for step in steps]
    return [f"{job_id}.{i}" for i in range(len(steps))]
