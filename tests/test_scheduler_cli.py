"""The `edgerun` command as a real process: targets, output, exit codes, --json, jobs.

One private Mosquitto, one service and three real agents for the module
(rack1-a and rack1-b online, rack2-x known but offline).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .brokers import Mosquitto, free_port, wait_until
from .mqttkit import ROOT, AgentProcess
from .scheduler_kit import Api, cli, cli_json, file_server, running_app, sha256_of, start_agent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, Path, str]]:
    tmp = tmp_path_factory.mktemp("cli")
    broker = Mosquitto(tmp / "mosquitto").start()
    agents: list[AgentProcess] = []
    try:
        with running_app(broker.url, tmp) as app:
            api = Api(app.api_url)
            for node in ("rack1-a", "rack1-b", "rack2-x"):
                agents.append(start_agent(broker.url, node, tmp))
                api.wait_node(node)
            assert agents[-1].terminate() == 0
            api.wait_node("rack2-x", "offline")
            yield api, tmp, broker.url
    finally:
        for agent in agents:
            if agent.alive():
                agent.kill()
        broker.stop()


def one_line_error(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgerun: error: "), text
    assert "Traceback" not in text
    return lines[0]


def test_run_on_one_node_streams_output_and_exits_with_the_remote_code(cluster) -> None:
    api, _, _ = cluster
    result = cli(api.url, "run", "rack1-a", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert result.code == 7
    assert "rack1-a | out" in result.out and "rack1-a | err" in result.err
    assert "failed (exit_status)" in result.err


def test_run_on_a_glob_prints_a_summary_and_exits_one_on_any_failure(cluster) -> None:
    api, _, _ = cluster
    ok = cli(api.url, "run", "rack1-*", "--", "echo hi")
    assert ok.code == 0, ok
    assert "rack1-a | hi" in ok.out and "rack1-b | hi" in ok.out
    table = ok.out.split("NODE", 1)[1]
    assert "rack1-a  succeeded" in table and "rack1-b  succeeded" in table
    bad = cli(api.url, "run", "rack1-a", "rack1-b", "--", "sh", "-c",
              'case "$PWD" in *rack1-b*) exit 4;; esac')
    assert bad.code == 1
    assert "rack1-b  failed" in bad.out and "rack1-a  succeeded" in bad.out


def test_online_means_only_online_nodes_and_json_lists_them(cluster) -> None:
    api, _, _ = cluster
    done = cli_json(api.url, "run", "--online", "--", "true")
    assert sorted(t["node"] for t in done["tasks"]) == ["rack1-a", "rack1-b"]
    assert {t["state"] for t in done["tasks"]} == {"succeeded"}
    nodes = cli_json(api.url, "nodes")["nodes"]
    assert {n["node"]: n["state"] for n in nodes} == {
        "rack1-a": "online", "rack1-b": "online", "rack2-x": "offline"}
    assert [n["node"] for n in cli_json(api.url, "nodes", "--online", "rack*")["nodes"]] == [
        "rack1-a", "rack1-b"]


def test_unknown_targets_exit_3(cluster) -> None:
    api, _, _ = cluster
    unknown = cli(api.url, "run", "nope", "--", "true")
    assert unknown.code == 3 and "unknown node 'nope'" in one_line_error(unknown.err)
    glob = cli(api.url, "download", "rack9-*", "http://x/y", "/tmp/y")
    assert glob.code == 3 and "no known node matches 'rack9-*'" in one_line_error(glob.err)
    missing = cli(api.url, "show", "no-such-task")
    assert missing.code == 3 and "no task" in one_line_error(missing.err)


def test_bad_arguments_exit_2_with_one_line(cluster) -> None:
    api, _, _ = cluster
    for args in (["run", "rack1-a"], ["run", "rack1-a", "--timeout", "-1", "--", "true"],
                 ["tasks", "--bogus"], ["download", "rack1-a", "ftp://x/y", "/tmp/y"],
                 ["download", "rack1-a", "http://x/y", "relative/path"],
                 ["run", "--", "true"], ["frobnicate"]):
        result = cli(api.url, *args)
        assert result.code == 2, (args, result)
        one_line_error(result.err)


def test_unreachable_service_exits_4_and_names_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = cli(url, "nodes")
    assert result.code == 4
    assert url in one_line_error(result.err) and "edgerun serve" in result.err


def test_download_checks_the_checksum(cluster) -> None:
    api, tmp, _ = cluster
    (tmp / "www").mkdir(exist_ok=True)
    (tmp / "www" / "blob").write_bytes(b"x" * 50_000)
    digest = sha256_of(tmp / "www" / "blob")
    with file_server(tmp / "www") as www:
        dest = tmp / "got" / "blob"
        dest.parent.mkdir(exist_ok=True)
        ok = cli(api.url, "download", "rack1-a", f"{www}/blob", str(dest), "--sha256", digest,
                 "--mode", "0600")
        assert ok.code == 0, ok
        assert sha256_of(dest) == digest and (dest.stat().st_mode & 0o777) == 0o600
        assert "rack1-a | downloaded 50000 bytes" in ok.out
        bad = cli(api.url, "download", "rack1-a", f"{www}/blob", str(tmp / "got" / "bad"),
                  "--sha256", "0" * 64)
        assert bad.code == 1 and "checksum_mismatch" in bad.err
        assert not (tmp / "got" / "bad").exists()


def test_listings_show_and_cancel(cluster) -> None:
    api, _, _ = cluster
    detached = cli_json(api.url, "run", "rack1-b", "--detach", "--", "sleep 60")
    [task] = detached["tasks"]
    api.wait_state(task["id"], "rack1-b", "running")
    running = cli_json(api.url, "tasks", "--node", "rack1-b", "--state", "running")["tasks"]
    assert [t["id"] for t in running] == [task["id"]]
    canceled = cli(api.url, "cancel", task["id"])
    assert canceled.code == 0 and f"task {task['id']} on rack1-b" in canceled.out
    api.wait_state(task["id"], "rack1-b", "canceled")
    [shown] = cli_json(api.url, "show", task["id"])["tasks"]
    assert [u["state"] for u in shown["updates"]][-1] == "canceled"
    text = cli(api.url, "show", task["id"])
    assert text.code == 0 and "state:      canceled" in text.out
    again = cli(api.url, "cancel", task["id"])
    assert again.code == 2 and "already finished" in again.err
    table = cli(api.url, "tasks", "--limit", "3")
    assert table.code == 0 and table.out.startswith("ID ") and task["id"] in table.out


def test_job_goes_on_per_node_only_after_success(cluster, tmp_path: Path) -> None:
    api, _, _ = cluster
    job = tmp_path / "bootstrap.toml"
    job.write_text('targets = ["rack1-*"]\n'
                   '[[steps]]\ntype = "shell"\ncommand = "echo one"\n'
                   '[[steps]]\ntype = "shell"\n'
                   'command = \'case "$PWD" in *rack1-b*) exit 9;; esac; echo two\'\n'
                   '[[steps]]\ntype = "shell"\ncommand = "echo three"\n')
    result = cli(api.url, "job", str(job), "--json")
    assert result.code == 1, result
    tasks = json.loads(result.out)["tasks"]
    by_node: dict[str, list[str]] = {}
    for task in sorted(tasks, key=lambda t: t["step"]):
        by_node.setdefault(task["node"], []).append(task["state"])
    assert by_node == {"rack1-a": ["succeeded", "succeeded", "succeeded"],
                       "rack1-b": ["succeeded", "failed", "canceled"]}
    canceled = next(t for t in tasks if t["state"] == "canceled")
    assert "step 2" in canceled["error"]["message"]
    job_id = json.loads(result.out)["job"]
    # the API aggregates the job: one progress row, and its targets paged
    assert api.get(f"/jobs/{job_id}")["progress"]["done"] == 6
    targets = api.get(f"/jobs/{job_id}/targets")["targets"]
    assert sum(len(t["steps"]) for t in targets) == 6


def test_config_layers_file_env_flag(cluster, tmp_path: Path) -> None:
    api, _, _ = cluster
    dead = f"http://127.0.0.1:{free_port()}"
    config = tmp_path / "edgerun.toml"
    config.write_text(f'[client]\napi = "{dead}"\n')
    file_only = cli(api.url, "nodes", "--config", str(config), env={"EDGERUN_API": None})
    assert file_only.code == 4 and dead in file_only.err
    env_beats_file = cli(api.url, "nodes", "--config", str(config))
    assert env_beats_file.code == 0 and "rack1-a" in env_beats_file.out
    flag_beats_env = cli(api.url, "nodes", "--api", api.url, env={"EDGERUN_API": dead})
    assert flag_beats_env.code == 0
    config.write_text("[client]\nbogus = 1\n")
    bad = cli(api.url, "nodes", "--config", str(config))
    assert bad.code == 2 and "unknown key `bogus`" in one_line_error(bad.err)


def test_broker_down_is_reported_with_its_url(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "m").start()
    try:
        with running_app(broker.url, tmp_path) as app:
            api = Api(app.api_url)
            agent = start_agent(broker.url, "lonely", tmp_path)
            api.wait_node("lonely")
            agent.kill()
            broker.kill()
            assert app.service is not None
            assert wait_until(lambda: not app.service.messenger.connected.is_set(), 30)
            result = cli(api.url, "run", "lonely", "--", "true")
            assert result.code == 4
            assert broker.url in one_line_error(result.err)
    finally:
        broker.stop()


def test_serve_exits_4_when_the_broker_is_unreachable(tmp_path: Path) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    result = cli("http://unused", "serve", "--broker", url, "--connect-timeout", "1",
                 "--db", str(tmp_path / "s.db"), "--listen", "127.0.0.1:0",
                 "--log-level", "error")
    assert result.code == 4
    assert f"cannot reach the broker {url}" in result.err and "Traceback" not in result.err
    bad = cli("http://unused", "serve", "--broker", "http://x", "--db", str(tmp_path / "t.db"))
    assert bad.code == 2 and "scheme must be one of" in one_line_error(bad.err)
    no_db = cli("http://unused", "serve", "--embedded-broker", "127.0.0.1:0", "--db",
                str(tmp_path / "no" / "such" / "s.db"), "--log-level", "error")
    assert no_db.code == 2 and "cannot open the task store" in one_line_error(no_db.err)


def test_a_task_for_an_offline_node_waits_for_it(cluster) -> None:
    api, tmp, broker = cluster
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGERUN_API": api.url}
    proc = subprocess.Popen([sys.executable, "-m", "edgerun.scheduler", "run", "rack2-x", "--",
                             "echo back"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)
    try:
        assert proc.stderr is not None
        note = proc.stderr.readline()
        assert "node rack2-x is offline; the task waits for it until it expires at" in note
        agent = start_agent(broker, "rack2-x", tmp)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "rack2-x | back" in out
        assert agent.terminate() == 0
        api.wait_node("rack2-x", "offline")
    finally:
        if proc.poll() is None:
            proc.kill()
