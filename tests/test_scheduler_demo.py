"""`./build.sh demo`'s script, run as a person would: a process, its exit code, its story."""

from __future__ import annotations

import os
import subprocess
import sys

from .mqttkit import ROOT


def test_demo_runs_every_kind_of_task_and_exits_zero() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EDGERUN_CONFIG", None)
    proc = subprocess.run([sys.executable, "-m", "edgerun.scheduler.demo"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env, check=False)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "demo-1 | step 1 of 3" in out and "demo-1 | step 3 of 3" in out  # live, by node
    assert "demo-1 | downloaded 262144 bytes" in out
    assert "demo-1 | disk check failed" in out
    assert "failed (exit_status)" in out and "timed_out (timeout)" in out
    table = out.split("$ edgerun tasks", 1)[1]
    for state in ("succeeded", "failed", "timed_out"):
        assert state in table
    assert "NOT AS EXPECTED" not in out and "demo passed" in out
