"""Jobs as graphs: named steps with `needs` across nodes (every node, then one controller
only when all succeeded), beside the ordered lists; broken graphs are clear errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgerun.control.errors import BadRequest
from edgerun.errors import ConfigError
from edgerun.control.jobfile import dependents, graph_of, parse_job_file
from edgerun.scheduler.service import Service
from edgerun.scheduler.store.records import TaskRow

from .brokers import Mosquitto, wait_until
from .fleet_kit import AgentSpec, pool
from .scheduler_kit import FINAL, Api, running_app


def shell(name: str, command: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "shell", "command": command, **extra}


@pytest.mark.parametrize("steps, problem", [
    ([shell("a", "x", needs=["b"])], "needs 'b', which is not a step"),
    ([shell("a", "x", needs=["b"]), shell("b", "x", needs=["a"])], "cycle: a -> b -> a"),
    ([shell("a", "x", needs=["a"])], "needs itself"),
    ([shell("a", "x"), shell("a", "y")], "used twice"),
    ([shell("a", "x"), {"type": "shell", "command": "y", "needs": ["a"]}], "needs a `name`"),
    ([shell("a b", "x")], "needs a `name`"),
    ([shell("a", "x", needs="a,b")], "not a step"),
    ([shell("a", "x", needs=[3])], "list of step names"),
])
def test_broken_graphs_are_refused_with_the_reason(steps: list[Any], problem: str) -> None:
    with pytest.raises(BadRequest, match=problem):
        graph_of(steps)
    with pytest.raises(ConfigError, match=problem):
        parse_job_file({"steps": steps})


def test_a_list_without_names_stays_an_ordered_list() -> None:
    assert graph_of([{"type": "shell", "command": "x"}]) is None
    graph = graph_of([shell("a", "x"), shell("b", "y", needs=["a"]),
                      shell("c", "z", needs=["b"])])
    assert graph is not None and dependents(graph, "a") == {"b", "c"}
    job = parse_job_file({"targets": ["n-*"], "where": "arch=x86_64",
                          "steps": [shell("a", "x")]})
    assert job.where == ["arch=x86_64"] and job.targets == ["n-*"]


@pytest.fixture
def cluster(mosquitto: Mosquitto, tmp_path: Path) -> Iterator[tuple[Api, Service]]:
    with running_app(mosquitto.url, tmp_path) as app:
        api, svc = Api(app.api_url), app.service
        assert svc is not None
        agents = [AgentSpec(n) for n in ("gw-1", "gw-2", "gw-3", "gctl")]
        with pool(mosquitto.url, tmp_path / "agents", agents, api):
            yield api, svc


def wait_job(svc: Service, job_id: str) -> list[TaskRow]:
    def done() -> bool:
        job = svc.store.job(job_id)
        return job is not None and all(t.state in FINAL for t in job.tasks)
    assert wait_until(done, 60, 0.1), svc.store.job(job_id)
    job = svc.store.job(job_id)
    assert job is not None
    return job.tasks


def test_every_node_then_the_controller_once_all_succeeded(
        cluster: tuple[Api, Service], tmp_path: Path) -> None:
    _, svc = cluster
    log = tmp_path / "order.log"
    job = svc.create_job(["gw-*"], False, [
        shell("inventory", f"sleep 0.2; echo inventory >> {log}"),
        shell("report", f"echo report >> {log}", needs=["inventory"], targets=["gctl"]),
    ], "graph-ok")
    assert sorted((t.node, t.id) for t in job.tasks) == [
        ("gctl", "graph-ok.report"), ("gw-1", "graph-ok.inventory"),
        ("gw-2", "graph-ok.inventory"), ("gw-3", "graph-ok.inventory")]
    tasks = wait_job(svc, "graph-ok")
    assert {t.state for t in tasks} == {"succeeded"}
    assert log.read_text().split() == ["inventory"] * 3 + ["report"]  # the report last
    report = next(t for t in tasks if t.node == "gctl")
    assert report.dispatched_at is not None
    assert all(t.updated_at <= report.dispatched_at for t in tasks if t is not report)


def test_a_failure_anywhere_cancels_what_needs_it(cluster: tuple[Api, Service]) -> None:
    _, svc = cluster
    svc.create_job(["gw-*"], False, [
        shell("probe", "true"),
        shell("flash", "exit 4", needs=["probe"], targets=["gw-2"]),
        shell("verify", "true", needs=["flash"]),
        shell("report", "true", needs=["verify", "probe"], targets=["gctl"]),
        shell("inventory", "true", needs=["probe"], targets=["gctl"]),
    ], "graph-bad")
    tasks = {(t.node, t.id.split(".", 1)[1]): t for t in wait_job(svc, "graph-bad")}
    assert tasks[("gw-2", "flash")].state == "failed"
    for key in [("gw-1", "verify"), ("gw-2", "verify"), ("gw-3", "verify"),
                ("gctl", "report")]:
        assert tasks[key].state == "canceled", key
        assert tasks[key].dispatched_at is None
        error = tasks[key].error
        assert error is not None
        assert "step 'flash' of job graph-bad ended failed on node gw-2" in error.message
    assert tasks[("gctl", "inventory")].state == "succeeded"  # it needed only probe


def test_an_ordered_list_still_runs_step_by_step(cluster: tuple[Api, Service],
                                                 tmp_path: Path) -> None:
    _, svc = cluster
    log = tmp_path / "list.log"
    svc.create_job(["gw-1"], False, [
        {"type": "shell", "command": f"sleep 0.2; echo one >> {log}"},
        {"type": "shell", "command": f"echo two >> {log}"},
        {"type": "shell", "command": "exit 1"},
        {"type": "shell", "command": f"echo never >> {log}"},
    ], "list-1")
    tasks = sorted(wait_job(svc, "list-1"), key=lambda t: t.step or 0)
    assert [t.state for t in tasks] == ["succeeded", "succeeded", "failed", "canceled"]
    assert log.read_text().split() == ["one", "two"]
