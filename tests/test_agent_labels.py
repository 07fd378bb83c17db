"""Labels an operator gives a node: every layer and its precedence, hostile labels, and
`--where labels.KEY=VALUE` against a live agent and a live `edgerun serve`.

Layers, lowest first: the facts directory's `labels`, the TOML file's `[labels]`, the
kernel command line's `edgerun.labels=`, EDGERUN_LABELS, `--label`. They merge key by
key; `key=` removes a key of a lower layer. A bad label is a warning, never an exit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgerun.agent import config
from edgerun.agent.factsd import OperatorFacts
from edgerun.agent.labels import MAX_LABELS, MAX_PROBLEMS

from .brokers import Mosquitto, free_port, wait_until
from .mqttkit import ROOT, AgentProcess, Observer, shell


def _config(tmp_path: Path, argv: list[str], env: dict[str, str] | None = None,
            cmdline: str = "", toml: str | None = None) -> config.AgentConfig:
    args = ["--broker", "mqtt://127.0.0.1:1883", "--node", "n1", *argv]
    if toml is not None:
        path = tmp_path / "agent.toml"
        path.write_text(toml)
        args += ["--config", str(path)]
    return config.load(args, env or {}, cmdline)


def _labels(cfg: config.AgentConfig, facts_dir: Path | None = None) -> dict[str, str]:
    found = OperatorFacts(cfg.label_layers, str(facts_dir) if facts_dir else None, 5.0).read()
    return dict(found.get("labels", {}))


def test_every_layer_with_its_precedence(tmp_path: Path) -> None:
    facts = tmp_path / "facts.d"
    facts.mkdir()
    (facts / "lab.json").write_text(json.dumps({"labels": {
        "rack": "r-facts", "role": "facts", "site": "facts", "lab": "facts", "gone": "facts"}}))
    toml = ('[labels]\nrack = "r-toml"\nrole = "toml"\nsite = "toml"\ngone = "toml"\n'
            'baked = "image"\n')
    cmdline = "quiet edgerun.labels=rack=r-kernel,role=kernel,zone=kernel console=ttyS0"
    env = {"EDGERUN_LABELS": "rack=r-env,gone=,envonly=yes"}
    cfg = _config(tmp_path, ["--label", "rack=r-flag", "--label", "flag=1,flag2=2"], env,
                  cmdline, toml)
    assert _labels(cfg, facts) == {
        "rack": "r-flag",        # flags beat everything
        "envonly": "yes",        # the environment
        "role": "kernel", "zone": "kernel",  # the kernel command line beats the file
        "site": "toml", "baked": "image",    # the file beats the facts directory
        "lab": "facts",          # the facts directory, where nothing above names the key
        "flag": "1", "flag2": "2",
    }  # and `gone=` in the environment removed the key the file and facts.d had set


@pytest.mark.parametrize("layer", ["toml", "kernel", "env", "flag"])
def test_each_layer_alone(tmp_path: Path, layer: str) -> None:
    argv: list[str] = []
    env: dict[str, str] = {}
    cmdline, toml = "", None
    if layer == "toml":
        toml = 'labels = "rack=r1,role=db"\n'  # a string works as well as a table
    elif layer == "kernel":
        cmdline = 'edgerun.labels="rack=r1,role=db"'  # quoted, as a boot loader may write it
    elif layer == "env":
        env["EDGERUN_LABELS"] = " rack=r1 , role=db ,"
    else:
        argv = ["--label", "rack=r1", "--label", "role=db"]
    assert _labels(_config(tmp_path, argv, env, cmdline, toml)) == {"rack": "r1", "role": "db"}


def test_no_labels_no_key_in_the_facts(tmp_path: Path) -> None:
    assert OperatorFacts(_config(tmp_path, []).label_layers, None, 1.0).read() == {}


def test_bad_labels_are_warnings_not_exits(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    cfg = _config(tmp_path, ["--label", "rack/1=x", "--label", "good=yes",
                             "--label", "noequals", "--label", "ok2=a b"],
                  {"EDGERUN_LABELS": "ünï=1,key:colon=1,fine=ok,val=semi;colon"},
                  "edgerun.labels=k=v=w,kernel=fine", '[labels]\nnum = 3\nstr = "s"\n')
    with caplog.at_level("WARNING", logger="edgerun.agent.factsd"):
        labels = _labels(cfg)
    assert labels == {"good": "yes", "fine": "ok", "kernel": "fine", "str": "s"}
    text = caplog.text
    for bad in ("'rack/1'", "'noequals'", "'a b'", "'ünï'", "'key:colon'", "'semi;colon'",
                "'v=w'", "num"):
        assert bad in text, (bad, text)


def test_labels_that_are_not_a_table(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _config(tmp_path, [], toml="labels = 5\n")
    with caplog.at_level("WARNING", logger="edgerun.agent.factsd"):
        assert _labels(cfg) == {}
    assert "labels must be a table of strings, not int" in caplog.text


def test_ten_thousand_labels_are_bounded(tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    many = ",".join(f"k{i:05d}=v{i}" for i in range(10_000))
    bad = ",".join(f"bad/{i}=v" for i in range(10_000))
    cfg = _config(tmp_path, ["--label", "zz-last=flag"], {"EDGERUN_LABELS": many},
                  f"edgerun.labels={bad}")
    with caplog.at_level("WARNING", logger="edgerun.agent.factsd"):
        labels = _labels(cfg)
    assert len(labels) == MAX_LABELS
    assert list(labels) == sorted(labels) and "k00000" in labels
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    # 10,000 bad ones: MAX_PROBLEMS quoted and one count; 10,000 good ones: one line
    assert len(warnings) == MAX_PROBLEMS + 2, [r.getMessage() for r in warnings]
    assert "9995 more bad labels ignored" in caplog.text
    assert f"10001 labels; kept the first {MAX_LABELS} by name" in caplog.text


def test_a_mistake_elsewhere_is_still_exit_2(tmp_path: Path) -> None:
    from edgerun.errors import ConfigError
    with pytest.raises(ConfigError, match="unknown key `label`"):
        _config(tmp_path, [], toml='label = "rack=r1"\n')
    with pytest.raises(ConfigError, match="facts_timeout"):
        _config(tmp_path, ["--facts-timeout", "0"])


# --- live: the agent process -----------------------------------------------------------
def test_agent_with_hostile_labels_comes_online_with_the_good_ones(
        mosquitto: Mosquitto, observer: Observer, tmp_path: Path) -> None:
    many = ",".join(f"k{i:05d}=v" for i in range(10_000))
    agent = AgentProcess(mosquitto.url, "lab-hostile", tmp_path / "agent",
                         "--label", "rack=r1", "--label", "bad key=x", "--label", "v=ü",
                         "--facts-dir", str(tmp_path / "none"),
                         env={"EDGERUN_LABELS": many}).start()
    status = agent.wait_online(observer)
    labels = status["facts"]["labels"]
    assert len(labels) == MAX_LABELS and labels["k00000"] == "v"
    assert "rack" not in labels  # `rack` sorts after k00099: the bound keeps names first
    assert "'bad key'" in agent.log() and "'ü'" in agent.log()
    observer.send("lab-hostile", shell("t1", "echo alive"))
    assert observer.final("t1")["stdout"] == "alive\n"


def test_kernel_command_line_labels_reach_the_status(mosquitto: Mosquitto, observer: Observer,
                                                     tmp_path: Path) -> None:
    """The agent reads /proc/cmdline itself; here main() is given one through the
    library API, as the image's kernel gives it (the boot test does it for real)."""
    cfg = config.load(["--broker", mosquitto.url, "--node", "lab-kernel", "--state-dir",
                       str(tmp_path / "state"), "--facts-dir", ""],
                      {}, "console=ttyS0 edgerun.labels=rack=r7,role=pxe")
    from .test_agent_facts import running_agent
    with running_agent(cfg):
        status = observer.wait("status", node="lab-kernel", state="online")[0]
    assert status["facts"]["labels"] == {"rack": "r7", "role": "pxe"}


# --- --where against a live scheduler --------------------------------------------------
def _edgerun() -> list[str]:
    script = shutil.which("edgerun", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "edgerun.scheduler"]


def _cli(api: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGERUN_API": api}
    env.pop("EDGERUN_CONFIG", None)
    return subprocess.run([*_edgerun(), *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120, check=False)


@pytest.fixture
def serve(mosquitto: Mosquitto, tmp_path: Path) -> Iterator[str]:
    """`edgerun serve` as a real process on the test's Mosquitto; yields its API URL."""
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EDGERUN_CONFIG", None)
    log = tmp_path / "serve.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([*_edgerun(), "serve", "--broker", mosquitto.url, "--db",
                                 str(tmp_path / "sched.db"), "--listen", f"127.0.0.1:{port}",
                                 "--tick", "0.2", "--grace", "1",
                                 "--client-id", f"sched-{uuid.uuid4().hex[:8]}",
                                 "--log-level", "warning"],
                                stdout=out, stderr=out, env=env, cwd=tmp_path)
    try:
        assert wait_until(lambda: _cli(api, "nodes").returncode == 0 or proc.poll() is not None,
                          60, 0.2), log.read_text()
        assert proc.poll() is None, log.read_text()
        yield api
    finally:
        proc.terminate()
        proc.wait(30)


def test_where_on_labels_against_a_live_scheduler(mosquitto: Mosquitto, serve: str,
                                                  tmp_path: Path) -> None:
    facts = tmp_path / "facts.d"
    facts.mkdir()
    (facts / "rack.json").write_text('{"labels": {"rack": "r1"}, "asset": "AT-0042"}')
    agents = [
        AgentProcess(mosquitto.url, "rack1-a", tmp_path / "a", "--label", "rack=r1",
                     "--label", "role=storage", "--facts-dir", str(tmp_path / "none")),
        AgentProcess(mosquitto.url, "rack1-b", tmp_path / "b", "--facts-dir", str(facts)),
        AgentProcess(mosquitto.url, "rack2-a", tmp_path / "c", "--facts-dir",
                     str(tmp_path / "none"), env={"EDGERUN_LABELS": "rack=r2,role=storage"}),
        AgentProcess(mosquitto.url, "nolabel", tmp_path / "d", "--facts-dir",
                     str(tmp_path / "none")),
    ]
    for agent in agents:
        agent.start()

    def listed(*where: str) -> list[str]:
        args = [x for w in where for x in ("--where", w)]
        result = _cli(serve, "nodes", "--json", "--online", *args)
        assert result.returncode == 0, result
        return sorted(n["node"] for n in json.loads(result.stdout)["nodes"])

    assert wait_until(lambda: len(listed()) == 4, 60, 0.2), [a.log()[-2000:] for a in agents]
    assert listed("labels.rack=r1") == ["rack1-a", "rack1-b"]
    assert listed("labels.rack=r*") == ["rack1-a", "rack1-b", "rack2-a"]
    assert listed("labels.rack!=r1") == ["nolabel", "rack2-a"]
    assert listed("labels.role=storage", "labels.rack=r2") == ["rack2-a"]
    assert listed("custom.asset=AT-0042") == ["rack1-b"]
    run = _cli(serve, "run", "--json", "--where", "labels.rack=r1", "--", "echo", "here")
    assert run.returncode == 0, run
    tasks = json.loads(run.stdout)["tasks"]
    assert sorted(t["node"] for t in tasks) == ["rack1-a", "rack1-b"]
    assert all(t["state"] == "succeeded" for t in tasks), tasks
