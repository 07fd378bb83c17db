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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edgerun.control.errors import BadRequest
from edgerun.errors import ConfigError

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


def step_ids(job_id: str, steps: Sequence[Any]) -> list[str]:
    """The task id of each step: `{job}.{name}` in a graph, `{job}.{i}` in a list."""
    if is_graph(steps):
        return [f"{job_id}.{step['name']}" for step in steps]
    return [f"{job_id}.{i}" for i in range(len(steps))]
