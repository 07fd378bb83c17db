"""The CLI's console-era commands against a real service and agents: logs -f, job show|cancel,
the fan-out progress line and what Ctrl-C prints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .apikit import Stack, stack
from .mqttkit import ROOT
from .scheduler_kit import cli, cli_json, start_agent


@pytest.fixture(scope="module")
def s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("cli")
    with stack(tmp, node="cli-a") as st:
        more = [start_agent(st.mosquitto.url, node, tmp) for node in ("cli-b", "cli-c")]
        try:
            for node in ("cli-b", "cli-c"):
                st.api().wait_node(node)
            yield st
        finally:
            for agent in more:
                agent.kill()


def test_logs_prints_a_finished_tasks_output_and_f_follows_a_running_one(s: Stack) -> None:
    api = s.api(s.operator)
    [done] = api.dispatch([s.node], {"type": "shell", "command": "echo recorded"})
    api.wait_state(done["id"], s.node, "succeeded")
    shown = cli(s.url, "logs", done["id"][:12])  # a unique prefix will do
    assert shown.code == 0 and shown.out == "recorded\n"
    [task] = api.dispatch([s.node], {"type": "shell", "command":
                                     "for i in 1 2 3; do echo tick $i; sleep 0.4; done; exit 4"})
    api.wait_state(task["id"], s.node, "running")
    followed = cli(s.url, "logs", "-f", task["id"])
    assert "tick 3" in followed.out
    assert followed.code == 4  # the task's own exit code, as `run` gives it


def test_fan_out_prints_a_progress_line(s: Stack) -> None:
    result = cli(s.url, "run", "cli-*", "--", "echo hi")
    assert result.code == 0, result
    assert "edgerun: 3/3 done, 0 failed" in result.err
    failing = cli(s.url, "run", "cli-a", "cli-b", "--", "false")
    assert failing.code == 1 and "2/2 done, 2 failed" in failing.err


def test_job_show_and_cancel(s: Stack, tmp_path: Path) -> None:
    job_file = tmp_path / "job.toml"
    job_file.write_text('targets = ["cli-*"]\n[[steps]]\ntype = "shell"\ncommand = "sleep 60"\n'
                        '[[steps]]\ntype = "shell"\ncommand = "echo never"\n')
    created = cli_json(s.url, "job", str(job_file), "--detach")
    job_id = created["tasks"][0]["job"]
    s.api().wait_state(f"{job_id}.0", "cli-a", "running")
    shown = cli(s.url, "job", "show", job_id)
    assert shown.code == 0, shown
    assert "3 nodes x 2 steps" in shown.out and "0/6 done, 0 failed" in shown.out
    assert shown.out.count("cli-") >= 3
    as_json = cli_json(s.url, "job", "show", job_id)
    assert len(as_json["targets"]) == 3 and as_json["progress"]["tasks"] == 6
    canceled = cli(s.url, "job", "cancel", job_id)
    assert canceled.code == 0 and "cancel sent to 6 open tasks" in canceled.out
    for node in ("cli-a", "cli-b", "cli-c"):
        s.api().wait_state(f"{job_id}.0", node, "canceled")
        s.api().wait_state(f"{job_id}.1", node, "canceled")
    assert cli(s.url, "job", "cancel", job_id).code == 2  # 409: nothing left to cancel
    assert cli(s.url, "job", "show", "no-such-job").code == 3


def test_ctrl_c_prints_the_tasks_it_leaves_running(s: Stack) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGERUN_API": s.url}
    # Ctrl-C reaches a foreground command with SIGINT's default action; a test run started
    # in the background of a non-interactive shell (`./build.sh test &`) ignores SIGINT,
    # and a child inherits that: Python then installs no KeyboardInterrupt at all
    proc = subprocess.Popen([sys.executable, "-m", "edgerun.scheduler", "run", "cli-a", "cli-b",
                             "--", "sleep 30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        api = s.api()

        def running() -> list[str]:
            return [t["id"] for t in api.get("/tasks", state="running")["tasks"]
                    if t["spec"]["command"] == "sleep 30"]
        from .apikit import wait_for
        wait_for(lambda: len(running()) == 2)
        [task_id] = set(running())
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "2 task(s) go on" in err
    assert f"{task_id} on cli-a" in err and f"{task_id} on cli-b" in err
    assert f"edgerun cancel {task_id}" in err
    api.post(f"/tasks/{task_id}/cancel", {})


def test_unknown_token_is_a_clear_error(s: Stack) -> None:
    result = cli(s.url, "nodes", "--token", "ert_nope")
    assert result.code != 0 and "unknown or revoked token" in result.err
    assert "Traceback" not in result.err
    parsed = cli(s.url, "tasks", "--state", "bogus")
    assert parsed.code == 2 and "`state`" in parsed.err
    assert json.loads(cli(s.url, "tasks", "--json").out)["tasks"]


def test_serve_refuses_plain_http_beyond_loopback_in_one_line(tmp_path: Path) -> None:
    result = cli("http://127.0.0.1:9", "serve", "--embedded-broker", "127.0.0.1:0",
                 "--db", str(tmp_path / "s.db"), "--listen", "0.0.0.0:0")
    assert result.code == 2
    assert result.err.strip().count("\n") == 0, result.err
    assert "--insecure-http" in result.err and "without TLS" in result.err
    (tmp_path / "cert.pem").write_text("not checked before the pair is complete\n")
    half = cli("http://127.0.0.1:9", "serve", "--embedded-broker", "127.0.0.1:0",
               "--db", str(tmp_path / "s.db"), "--tls-cert", str(tmp_path / "cert.pem"))
    assert half.code == 2 and "together" in half.err


def test_nodes_lists_every_page(s: Stack) -> None:
    from .apikit import FakeFleet, wait_for
    fleet = FakeFleet(s.mosquitto.url)
    try:
        fleet.online([f"many-{i:04d}" for i in range(1100)])
    finally:
        fleet.close()
    wait_for(lambda: s.api().get("/nodes", match="many-*", limit=1)["total"] == 1100, 120)
    listed = cli_json(s.url, "nodes", "many-*")["nodes"]
    assert len(listed) == 1100 and listed[-1]["node"] == "many-1099"
