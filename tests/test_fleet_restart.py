"""A restarted service carries on: a rollout's window and a job's held steps resume from
the store, and nothing runs twice."""

from __future__ import annotations

from pathlib import Path

from edgerun.scheduler.app import App

from .brokers import Mosquitto, wait_until
from .fleet_kit import AgentSpec, pool
from .scheduler_kit import Api, serve_values


def test_rollout_and_job_resume_after_a_restart(mosquitto: Mosquitto, tmp_path: Path) -> None:
    values = serve_values(mosquitto.url, tmp_path)
    log = tmp_path / "ran.log"
    app = App(values).start()
    try:
        api, svc = Api(app.api_url), app.service
        assert svc is not None
        agents = [AgentSpec(f"rs-{i}") for i in range(6)]
        with pool(mosquitto.url, tmp_path / "agents", agents, api):
            rollout = svc.rollouts.create(
                ["rs-*"], False, {"type": "shell", "command": f"sleep 0.4; echo r >> {log}"},
                {"batch": 1})
            job = svc.create_job(["rs-0"], False, [
                {"type": "shell", "command": f"sleep 0.4; echo j{i} >> {log}"}
                for i in range(3)], "rs-job")
            assert wait_until(lambda: svc.rollouts.show(rollout["id"])["counts"]
                              ["succeeded"] >= 2, 60, 0.05)
            app.stop()
            app = App(values).start()  # the same store, session and queue
            svc = app.service
            assert svc is not None
            done = wait_until(lambda: svc.rollouts.show(rollout["id"])["state"]
                              == "finished", 60, 0.1)
            assert done, svc.rollouts.show(rollout["id"])

            def job_done() -> bool:
                found = svc.store.job(job.id)
                return found is not None and all(t.state == "succeeded" for t in found.tasks)
            assert wait_until(job_done, 60, 0.1), svc.store.job(job.id)
            assert svc.rollouts.show(rollout["id"])["counts"]["succeeded"] == 6
        lines = log.read_text().split()
        assert lines.count("r") == 6  # each target ran once
        assert [x for x in lines if x.startswith("j")] == ["j0", "j1", "j2"]
    finally:
        app.stop()
