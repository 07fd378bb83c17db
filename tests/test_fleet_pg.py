"""The fleet operations on a PostgreSQL store: the same SQL, real agents."""

from __future__ import annotations

from pathlib import Path

from edgerun.scheduler.store.fleetdb import FleetDB

from .brokers import Mosquitto, wait_until
from .fleet_kit import AgentSpec, make_sys_root, pool
from .pg import pg_database, pg_url  # noqa: F401
from .scheduler_kit import Api, running_app


def test_pacing_retries_rollouts_and_graphs_on_postgresql(
        mosquitto: Mosquitto, tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    with running_app(mosquitto.url, tmp_path, db=pg_url, pace=4) as app:
        api, svc = Api(app.api_url), app.service
        assert svc is not None
        agents = [AgentSpec(f"pg-{i}", str(make_sys_root(tmp_path / f"r{i}", vendor=vendor)),
                            queue_size=8)
                  for i, vendor in enumerate(["Dell Inc.", "Dell Inc.", "HPE"])]
        with pool(mosquitto.url, tmp_path / "agents", agents, api):
            # pacing: 60 tasks to one node whose agent holds 8: none busy
            ids = [svc.dispatch(["pg-0"], False, {"type": "shell", "command": "true"})[0].id
                   for _ in range(60)]
            def paced_done() -> bool:
                return all((t := svc.store.get("pg-0", i)) is not None
                           and t.state == "succeeded" for i in ids)
            assert wait_until(paced_done, 120, 0.2)
            # facts and retries
            [task] = svc.dispatch([], False, {"type": "shell", "command": "exit 2"},
                                  where=["dmi.vendor=HPE"],
                                  retry={"retries": 1, "on": ["failed"], "delay": 0})
            assert task.node == "pg-2"
            api.wait_state(f"{task.id}.a2", "pg-2", "failed")
            attempts = FleetDB(svc.store).attempts("pg-2", task.id)
            assert [a.attempt for a in attempts] == [1, 2]
            # a rollout that aborts
            rollout = svc.rollouts.create(["pg-*"], False,
                                                {"type": "shell", "command": "exit 1"},
                                                {"batch": 1, "abort_after": 1})
            assert wait_until(lambda: svc.rollouts.show(rollout["id"])["state"]
                              == "aborted", 60, 0.1)
            assert svc.rollouts.show(rollout["id"])["counts"]["skipped"] == 2
            # a graph
            svc.create_job(["pg-0", "pg-1"], False, [
                {"name": "a", "type": "shell", "command": "true"},
                {"name": "b", "type": "shell", "command": "true", "needs": ["a"],
                 "targets": ["pg-2"]}], "pg-graph")

            def graph_done() -> bool:
                job = svc.store.job("pg-graph")
                return job is not None and all(t.state == "succeeded" for t in job.tasks)
            assert wait_until(graph_done, 60, 0.1)
