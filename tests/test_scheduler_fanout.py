"""Fan-out of one command to 200 real agents (50 per process), 200 results recorded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .brokers import Mosquitto, wait_until
from .mqttkit import ROOT
from .scheduler_kit import Api, cli, running_app

NODES, PER_PROCESS = 200, 50


@pytest.mark.slow
def test_one_command_to_200_agents_records_200_results(mosquitto: Mosquitto,
                                                        tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    pools: list[subprocess.Popen[bytes]] = []
    with running_app(mosquitto.url, tmp_path, grace=30.0) as app:
        api = Api(app.api_url)
        try:
            for first in range(0, NODES, PER_PROCESS):
                with open(tmp_path / f"pool-{first}.log", "ab") as log:
                    pools.append(subprocess.Popen(
                        [sys.executable, "-m", "tests.agent_pool", mosquitto.url, "fan-",
                         str(first), str(PER_PROCESS), str(tmp_path / "agents")],
                        stdout=log, stderr=log, env=env, cwd=ROOT))

            def online() -> int:
                return len(api.get("/nodes", online=1)["nodes"])
            assert wait_until(lambda: online() == NODES, 120, 0.5), f"{online()} online"

            result = cli(api.url, "run", "fan-*", "--timeout", "120", "--", "echo ok",
                         timeout=300)
            assert result.code == 0, result.err[-2000:]
            assert sum(1 for line in result.out.splitlines() if line.endswith(" | ok")) == NODES
            done = api.get("/tasks", state="succeeded", limit=1000)["tasks"]
            assert len(done) == NODES
            assert len({t["node"] for t in done}) == NODES
            assert len({t["id"] for t in done}) == 1  # one command, one id, every node
            assert all(t["exit_code"] == 0 for t in done)  # lists carry no output tails
        finally:
            for pool in pools:
                pool.terminate()
            for pool in pools:
                try:
                    pool.wait(60)
                except subprocess.TimeoutExpired:
                    pool.kill()
