"""The CLI following retries and rollouts against a live scheduler with real agents (issue
24): retries said as they happen, a retry chain's outcome on top of `show` and its short
prefix resolving to the chain, pauses and resumes said as they happen, an abort in one
line, and a rollout's last progress line agreeing with its summary."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from .brokers import wait_until
from .fleet_kit import fleet_api
from .mqttkit import ROOT
from .scheduler_kit import Api, cli

NODES = ("cf-1", "cf-2", "cf-3", "cf-4")


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with fleet_api(tmp_path_factory.mktemp("clifollow"), NODES) as client:
        yield client


def test_retries_are_said_as_they_happen_and_the_chain_shows_its_outcome(
        api: Api, tmp_path: Path) -> None:
    counter = tmp_path / "tries"
    # fails on its first attempt, succeeds on its second
    command = (f"n=$(cat {counter} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {counter}; "
               f"echo try $n; [ $n -ge 2 ]")
    result = cli(api.url, "run", "cf-1", "--retries", "2", "--retry-on", "failed",
                 "--retry-delay", "0", "--", command)
    assert result.code == 0, result
    assert "edgerun: cf-1: attempt 1 of 3 failed (exit 1); retrying as attempt 2" in result.err
    assert "attempt 2 of 3" not in result.err
    assert "cf-1 | try 1" in result.out and "cf-1 | try 2" in result.out
    root = next(t for t in api.get("/tasks", node="cf-1", limit=20)["tasks"]
                if t.get("attempt") == 1 and "tries" in str(t["spec"]))["id"]

    shown = cli(api.url, "show", root[:8])  # a short prefix of the chain: its root
    assert shown.code == 0, shown
    lines = shown.out.splitlines()
    assert lines[0] == f"outcome:    succeeded on attempt 2 of 2 ({root}.a2)"
    assert f"id:         {root}" in lines
    assert "state:      failed (attempt 1)" in lines
    exact = cli(api.url, "show", f"{root}.a2")
    assert exact.code == 0 and f"id:         {root}.a2" in exact.out


def test_an_abort_prints_one_line_and_progress_agrees_with_the_summary(api: Api) -> None:
    result = cli(api.url, "run", "cf-*", "--batch", "1", "--abort-after", "1", "--", "exit 1")
    assert result.code == 1, result
    rollout_id = result.err.split("rollout ", 1)[1].split(":", 1)[0]
    summary = next(x for x in result.out.splitlines() if x.startswith(f"rollout {rollout_id}:"))
    assert summary == f"rollout {rollout_id}: aborted, 1 failed, 3 skipped"
    progress = [x for x in result.err.splitlines() if " done, " in x]
    assert progress[-1] == "edgerun: 4/4 done, 1 failed, 3 skipped"
    assert all("4 failed" not in x and "2 failed" not in x for x in progress)
    skipped = [x for x in result.err.splitlines() if "skipped" in x and " done, " not in x]
    assert len(skipped) == 1, result.err
    assert skipped[0].startswith("edgerun: 3 target(s) skipped because the rollout was aborted")
    assert f"rollout {rollout_id} aborted: 1 target failed" in result.err
    assert result.err.count("task ") == 1  # the one failure, explained once


def test_a_followed_rollout_says_when_it_is_paused_and_resumed(api: Api) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGERUN_API": api.url}
    env.pop("EDGERUN_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "-m", "edgerun.scheduler", "run", "cf-*",
                             "--batch", "1", "--", "sleep 0.5"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    stderr = proc.stderr
    assert stderr is not None
    reader = threading.Thread(target=lambda: err.extend(iter(stderr.readline, "")),
                              daemon=True)
    reader.start()
    try:
        assert wait_until(lambda: any(x.startswith("edgerun: rollout ") for x in err), 30, 0.05)
        rollout_id = err[0].split("rollout ", 1)[1].split(":", 1)[0]
        assert cli(api.url, "rollout", "pause", rollout_id).code == 0
        assert wait_until(lambda: any(f"rollout {rollout_id} paused" in x for x in err),
                          30, 0.05), err
        assert cli(api.url, "rollout", "resume", rollout_id).code == 0
        assert wait_until(lambda: any(f"rollout {rollout_id} resumed" in x for x in err),
                          30, 0.05), err
        proc.wait(timeout=60)  # stderr is the reader thread's alone (no communicate())
        out = proc.stdout.read() if proc.stdout else ""
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(5)
    assert proc.returncode == 0, (out, err)
    assert f"rollout {rollout_id}: finished, 4 succeeded" in out
    assert [x for x in err if " done, " in x][-1] == "edgerun: 4/4 done, 0 failed\n"
