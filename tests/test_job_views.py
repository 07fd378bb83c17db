"""Every job shape through the API and `edgerun job show`, against a live scheduler with real
agents: a graph whose steps target different nodes, an ordered list, a single step on a
glob. Progress counts the job's real tasks, never nodes x steps."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from .brokers import wait_until
from .fleet_kit import fleet_api
from .scheduler_kit import FINAL, Api, cli

NODES = ("jv-1", "jv-2", "jv-3", "jv-ctl")


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with fleet_api(tmp_path_factory.mktemp("jobviews"), NODES) as client:
        yield client


def finished(api: Api, job_id: str) -> dict[str, Any]:
    def done() -> bool:
        p = api.get(f"/jobs/{job_id}")["progress"]
        return bool(p["tasks"]) and p["done"] == p["tasks"]
    assert wait_until(done, 60, 0.1), api.get(f"/jobs/{job_id}")
    job: dict[str, Any] = api.get(f"/jobs/{job_id}")
    return job


def test_a_graph_over_different_nodes_reads_5_of_5_and_job_show_prints_it(api: Api) -> None:
    job = api.post("/jobs", {"id": "graph-5", "targets": ["jv-[123]"], "steps": [
        {"name": "inventory", "type": "shell", "command": "echo inv"},
        {"name": "report", "needs": ["inventory"], "targets": ["jv-ctl"], "type": "shell",
         "command": "echo report"},
        {"name": "tidy", "needs": ["report"], "targets": ["jv-1"], "type": "shell",
         "command": "false"}]})
    # 3 + 1 + 1 tasks over 4 nodes: nodes x steps would say 12
    assert job["progress"]["tasks"] == 5
    job = finished(api, "graph-5")
    p = job["progress"]
    assert (p["done"], p["tasks"], p["failed"], p["succeeded"]) == (5, 5, 1, 4)
    assert [(s["tasks"], s["done"]) for s in p["steps"]] == [(3, 3), (1, 1), (1, 1)]
    assert job["steps"][1]["nodes"] == ["jv-ctl"]

    shown = cli(api.url, "job", "show", "graph-5")
    assert shown.code == 0 and "Traceback" not in shown.err, shown
    assert "5/5 done, 1 failed" in shown.out
    head = shown.out.splitlines()[0]
    assert head.startswith("job graph-5  by ") and " UTC  started " in head
    assert " UTC  ended " in head and head.endswith(" UTC")
    assert "graph: 4 nodes x 3 steps, 5 tasks" in shown.out
    assert "step report (shell echo report) needs inventory: 1/1 done: 1 succeeded" in shown.out
    table = shown.out.split("\n\n", 1)[1].splitlines()
    assert table[0].split() == ["NODE", "STEP", "INVENTORY", "STEP", "REPORT", "STEP", "TIDY"]
    # the node whose step failed comes first; a step that does not target a node shows `-`
    assert table[1].split() == ["jv-1", "succeeded", "-", "failed"]
    assert table[2].split()[:2] == ["jv-2", "succeeded"] and table[2].split()[2:] == ["-", "-"]
    ctl = next(r for r in table if r.startswith("jv-ctl")).split()
    assert ctl == ["jv-ctl", "-", "succeeded", "-"]
    as_json = json.loads(cli(api.url, "job", "--json", "show", "graph-5").out)
    assert as_json["progress"]["tasks"] == 5 and len(as_json["targets"]) == 4


def test_an_ordered_list_and_a_single_step_job_show_too(api: Api) -> None:
    api.post("/jobs", {"id": "list-2", "targets": ["jv-1", "jv-2"], "steps": [
        {"type": "shell", "command": "true"}, {"type": "shell", "command": "echo two"}]})
    job = finished(api, "list-2")
    assert (job["progress"]["done"], job["progress"]["tasks"]) == (4, 4)
    shown = cli(api.url, "job", "show", "list-2")
    assert shown.code == 0, shown
    assert "ordered steps: 2 nodes x 2 steps, 4 tasks" in shown.out
    assert "4/4 done, 0 failed" in shown.out

    api.post("/jobs", {"id": "one-4", "targets": ["jv-*"], "steps": [
        {"type": "shell", "command": "true"}]})
    finished(api, "one-4")
    shown = cli(api.url, "job", "show", "one-4")
    assert shown.code == 0, shown
    assert "one step: 4 nodes x 1 step, 4 tasks" in shown.out
    assert "4/4 done, 0 failed" in shown.out
    assert all(t["state"] in FINAL for t in api.get("/tasks", job="one-4")["tasks"])


def test_a_cli_run_on_a_glob_is_one_job_with_one_progress_line(api: Api) -> None:
    before = {j["id"] for j in api.get("/jobs", limit=200)["jobs"]}
    result = cli(api.url, "run", "jv-*", "--", "echo fan")
    assert result.code == 0, result
    progress = [x for x in result.err.splitlines() if " done, " in x]
    assert progress[-1] == "edgerun: 4/4 done, 0 failed"  # one progress line for the fan-out
    assert sum(1 for x in result.out.splitlines() if x.endswith(" | fan")) == 4
    [job] = [j for j in api.get("/jobs", limit=200)["jobs"] if j["id"] not in before]
    assert (job["progress"]["tasks"], job["progress"]["done"]) == (4, 4)
    assert job["steps"][0]["command"] == "echo fan"
    one = cli(api.url, "run", "jv-1", "--", "echo one")  # one node: a plain task, no job
    assert one.code == 0 and "jv-1 | one" in one.out
    assert {j["id"] for j in api.get("/jobs", limit=200)["jobs"]} - before == {job["id"]}
