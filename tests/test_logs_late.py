"""Following is cheap and whole (issue 22): `edgerun logs -f` attached to a task that is
already running prints what it wrote before, then follows live, with no gap and no
repeat; a task's detail for one node is a single-row read."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgerun.control.errors import NotFound

from .apikit import Stack, stack
from .brokers import wait_until
from .mqttkit import ROOT
from .scheduler_kit import cli, start_agent


@pytest.fixture(scope="module")
def s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("logs")
    with stack(tmp, node="late-a") as st:
        more = [start_agent(st.mosquitto.url, node, tmp) for node in ("late-b", "late-c")]
        try:
            for node in ("late-b", "late-c"):
                st.api().wait_node(node)
            yield st
        finally:
            for agent in more:
                agent.kill()


def test_logs_f_attached_late_prints_the_earlier_output_then_follows(s: Stack,
                                                                     tmp_path: Path) -> None:
    flag = tmp_path / "go"
    api = s.api(s.operator)
    command = (f"for i in 1 2 3; do echo early-$i; done; "
               f"while [ ! -e {flag} ]; do sleep 0.05; done; "
               f"for i in 1 2 3; do echo late-$i; done")
    [task] = api.dispatch([s.node], {"type": "shell", "command": command})

    def heard_early() -> bool:
        [detail] = api.get(f"/tasks/{task['id']}", node=s.node)["tasks"]
        text = "".join(c["data"] for c in detail.get("live_output") or ())
        return "early-3" in text
    assert wait_until(heard_early, 30, 0.05), "the service never heard the early output"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGERUN_API": s.url}
    env.pop("EDGERUN_CONFIG", None)
    follower = subprocess.Popen([sys.executable, "-m", "edgerun.scheduler", "logs", "-f",
                                 task["id"]], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env, cwd=ROOT)
    flag.write_text("")  # the task goes on while (or before) the follower attaches
    out, err = follower.communicate(timeout=60)
    assert follower.returncode == 0, err
    assert out == "".join(f"early-{i}\n" for i in (1, 2, 3)) + \
        "".join(f"late-{i}\n" for i in (1, 2, 3)), out


def test_a_finished_tasks_detail_has_no_live_output_and_one_node_is_one_row(s: Stack) -> None:
    api = s.api(s.operator)
    [task] = api.dispatch([s.node], {"type": "shell", "command": "true"})
    done = api.wait_state(task["id"], s.node, "succeeded")
    assert "live_output" not in done
    # empty output is no output: the list's record says so (no {"stdout": 0})
    listed = [t for t in api.get("/tasks", node=s.node)["tasks"] if t["id"] == task["id"]]
    assert listed and listed[0]["result"].get("output", {}) == {}
    with pytest.raises(NotFound, match="on node no-such-node"):
        api.get(f"/tasks/{task['id']}", node="no-such-node")


def test_run_cut_off_as_a_slow_reader_resumes_and_misses_nothing(
        s: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fan-out's burst of events can pass the per-reader limit before a terminal reads
    it; `run` then reopens the stream from the last event it got, not from the id the
    error names, and sees every node end once."""
    from edgerun.scheduler.api import streams
    monkeypatch.setattr(streams, "MAX_PENDING_BYTES", 1500)  # about one event's worth
    result = cli(s.url, "run", "late-*", "--", "echo one-line")
    assert result.code == 0, result
    assert "3/3 done, 0 failed" in result.err
    assert sorted(line for line in result.out.splitlines() if " | " in line) == [
        f"late-{n} | one-line" for n in "abc"]  # each node's output once
