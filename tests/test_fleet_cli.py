"""Fleet operations through the real `edgerun` command and the HTTP API: --where, MAC
targets, retries, rollouts (`edgerun rollout ...`), graph job files, `run -i`."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgerun.control.errors import SchedulerError

from .brokers import Mosquitto, wait_until
from .fleet_kit import AgentSpec, make_sys_root, pool
from .mqttkit import ROOT
from .scheduler_kit import Api, Result, cli, cli_json, running_app


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("fleetcli")
    broker = Mosquitto(tmp / "mosquitto").start()
    roots = {"cli-dell-1": ("Dell Inc.", "52:54:00:00:00:01"),
             "cli-dell-2": ("Dell Inc.", "52:54:00:00:00:02"),
             "cli-hp-1": ("HPE", "aa:bb:cc:00:00:03")}
    agents = [AgentSpec(node, str(make_sys_root(tmp / node, vendor=v, macs={"eth0": m})))
              for node, (v, m) in roots.items()]
    try:
        with running_app(broker.url, tmp) as app:
            api = Api(app.api_url)
            with pool(broker.url, tmp / "agents", agents, api):
                yield api
    finally:
        broker.stop()


def one_line_error(result: Result) -> str:
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgerun: error: "), result
    assert "Traceback" not in result.err
    return lines[0]


def test_run_where_and_mac_targets(fleet: Api) -> None:
    done = cli_json(fleet.url, "run", "--where", "dmi.sys_vendor=Dell*", "--", "echo hi")
    assert sorted(t["node"] for t in done["tasks"]) == ["cli-dell-1", "cli-dell-2"]
    by_mac = cli(fleet.url, "run", "AA:BB:CC:00:00:03", "--", "echo mac")
    assert by_mac.code == 0 and "cli-hp-1 | mac" in by_mac.out, by_mac
    nodes = cli_json(fleet.url, "nodes", "--where", "macs=52:54:00:*", "--where",
                     "dmi.vendor!=HPE")
    assert sorted(n["node"] for n in nodes["nodes"]) == ["cli-dell-1", "cli-dell-2"]


def test_bad_where_is_exit_2_on_the_cli_and_422_on_the_api(fleet: Api) -> None:
    bad = cli(fleet.url, "run", "cli-*", "--where", "cpus>=many", "--", "true")
    assert bad.code == 2 and "not a number" in one_line_error(bad)
    none = cli(fleet.url, "run", "--where", "arch=sparc", "--", "true")
    assert none.code == 3 and "arch=sparc" in one_line_error(none)
    with pytest.raises(SchedulerError) as caught:
        fleet.post("/tasks", {"targets": ["cli-*"], "where": ["arch"],
                              "task": {"type": "shell", "command": "true"}})
    assert "no operator" in str(caught.value)
    status = fleet_status(fleet, {"targets": ["cli-*"], "where": ["arch"],
                                  "task": {"type": "shell", "command": "true"}})
    assert status[0] == 422 and status[1]["code"] == "invalid"


def fleet_status(api: Api, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    """Status and JSON body of a raw POST /v1/tasks."""
    request = urllib.request.Request(f"{api.url}/v1/tasks", json.dumps(body).encode(),
                                     api._headers(body=True), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_retries_show_every_attempt(fleet: Api) -> None:
    result = cli(fleet.url, "run", "cli-dell-1", "--retries", "2", "--retry-on", "failed",
                 "--retry-delay", "0", "--", "sh -c 'echo try; exit 3'")
    assert result.code == 3, result
    assert result.out.count("cli-dell-1 | try") == 3
    tasks = cli_json(fleet.url, "tasks", "--node", "cli-dell-1")["tasks"]
    attempts = sorted((t for t in tasks if t["exit_code"] == 3), key=lambda t: t["attempt"])
    assert [t["attempt"] for t in attempts][-3:] == [1, 2, 3]
    first, second, third = attempts[-3:]
    assert second["parent"] == first["id"] and third["parent"] == second["id"]
    assert third["id"] == f"{first['id']}.a3"
    shown = cli(fleet.url, "show", first["id"], "--node", "cli-dell-1")
    assert shown.code == 0, shown
    line = next(x for x in shown.out.splitlines() if x.startswith("attempts:"))
    assert f"{first['id']} failed" in line and f"{first['id']}.a3 failed" in line


def test_rollout_aborts_reports_why_and_is_shown(fleet: Api) -> None:
    result = cli(fleet.url, "run", "cli-*", "--batch", "1", "--abort-after", "1", "--",
                 "exit 1")
    assert result.code == 1, result
    assert "aborted" in result.out and "reason: 1 target failed" in result.out
    rollout_id = result.err.split("rollout ", 1)[1].split(":", 1)[0]
    shown = cli(fleet.url, "rollout", "show", rollout_id)
    assert shown.code == 0 and "skipped" in shown.out and "failed" in shown.out, shown
    listed = cli_json(fleet.url, "rollout", "list")["rollouts"]
    assert any(r["id"] == rollout_id and r["state"] == "aborted" for r in listed)
    again = cli(fleet.url, "rollout", "resume", rollout_id)
    assert again.code != 0 and "only a paused rollout" in one_line_error(again)
    missing = cli(fleet.url, "rollout", "show", "nope")
    assert missing.code == 3 and "no rollout" in one_line_error(missing)
    bad = cli(fleet.url, "run", "cli-*", "--batch", "2", "--abort-after", "110%", "--",
              "true")
    assert bad.code == 2 and "at most 100" in one_line_error(bad)
    lonely = cli(fleet.url, "run", "cli-*", "--abort-after", "2", "--", "true")
    assert lonely.code == 2 and "--batch" in one_line_error(lonely)


def test_rollout_that_succeeds_exits_0(fleet: Api) -> None:
    result = cli(fleet.url, "run", "--where", "dmi.vendor=Dell*", "--batch", "1", "--rate",
                 "600/min", "--", "echo ok")
    assert result.code == 0, result
    assert "finished, 2 succeeded" in result.out


def test_graph_job_file(fleet: Api, tmp_path: Path) -> None:
    job = tmp_path / "graph.toml"
    job.write_text('where = ["dmi.vendor=Dell*"]\n'
                   '[[steps]]\nname = "probe"\ntype = "shell"\ncommand = "echo probe"\n'
                   '[[steps]]\nname = "report"\nneeds = ["probe"]\ntargets = ["cli-hp-1"]\n'
                   'type = "shell"\ncommand = "echo report"\n')
    result = cli(fleet.url, "job", "--json", str(job))
    assert result.code == 0, result
    tasks = json.loads(result.out)["tasks"]
    assert sorted((t["node"], t["id"].rsplit(".", 1)[1]) for t in tasks) == [
        ("cli-dell-1", "probe"), ("cli-dell-2", "probe"), ("cli-hp-1", "report")]
    assert {t["state"] for t in tasks} == {"succeeded"}


def run_with_stdin(api: str, data: bytes, *args: str) -> Result:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGERUN_API": api}
    env.pop("EDGERUN_CONFIG", None)
    proc = subprocess.run([sys.executable, "-m", "edgerun.scheduler", *args], input=data,
                          capture_output=True, timeout=90, env=env, cwd=ROOT, check=False)
    return Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def test_run_i_forwards_stdin(fleet: Api) -> None:
    text = "line one\nzwei - \u00fcnicode\n" * 100
    result = run_with_stdin(fleet.url, text.encode(), "run", "cli-dell-1", "-i", "--",
                            "sha256sum")
    assert result.code == 0, result
    assert hashlib.sha256(text.encode()).hexdigest() in result.out
    binary = run_with_stdin(fleet.url, b"\xff\xfe\x00", "run", "cli-dell-1", "-i", "--", "cat")
    assert binary.code == 2 and "not UTF-8" in one_line_error(binary)
    big = run_with_stdin(fleet.url, b"x" * (200 * 1024), "run", "cli-dell-1", "-i", "--",
                         "cat")
    assert big.code == 2 and "192 KiB" in one_line_error(big)


def test_the_openapi_document_describes_rollouts_and_where(fleet: Api) -> None:
    doc = fleet.get("/openapi.json")
    for path in ("/v1/rollouts", "/v1/rollouts/{id}", "/v1/rollouts/{id}/abort"):
        assert path in doc["paths"]
    # the schemas sit beside their routes, inline in each operation
    def body(path: str) -> Any:
        return doc["paths"][path]["post"]["requestBody"]["content"]["application/json"][
            "schema"]
    dispatch, rollout = body("/v1/tasks"), body("/v1/rollouts")
    assert "where" in dispatch["properties"] and "retry" in dispatch["properties"]
    assert rollout["required"] == ["task"]


def test_a_detached_rollout_is_paused_shown_and_resumed(fleet: Api) -> None:
    started = cli(fleet.url, "run", "cli-*", "--detach", "--batch", "1", "--",
                  "sleep 0.5")
    assert started.code == 0, started
    rollout_id = started.err.split("rollout ", 1)[1].split(":", 1)[0]
    paused = cli(fleet.url, "rollout", "pause", rollout_id)
    assert paused.code == 0 and f"rollout {rollout_id}: paused" in paused.out, paused
    shown = cli_json(fleet.url, "rollout", "show", rollout_id)
    assert shown["state"] == "paused" and shown["counts"]["pending"] >= 1
    assert {t["phase"] for t in shown["targets"]} <= {"pending", "active", "succeeded"}
    resumed = cli(fleet.url, "rollout", "resume", rollout_id)
    assert resumed.code == 0, resumed

    def finished() -> bool:
        return bool(cli_json(fleet.url, "rollout", "show", rollout_id)["state"] == "finished")
    assert wait_until(finished, 60, 0.3)
    done = cli_json(fleet.url, "rollout", "show", rollout_id)
    assert done["counts"]["succeeded"] == 3 and done["reason"] is None
