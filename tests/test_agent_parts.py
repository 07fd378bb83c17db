"""Agent parts with no broker: task log, identity, configuration, back-off."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgerun.agent import config, identity, store
from edgerun.backoff import Backoff, backoff_delay
from edgerun.errors import ConfigError
from edgerun.settings import kernel_params, parse_broker_url

from .mqttkit import ROOT


def update(task_id: str, state: str, **extra: object) -> dict[str, object]:
    return {"v": 1, "kind": "update", "id": task_id, "node": "n", "state": state,
            "at": "2026-11-22T06:00:00.000Z", **extra}


# --- task log ------------------------------------------------------------------------------

def test_task_log_remembers_latest_update_across_restarts(tmp_path: Path) -> None:
    log = store.TaskLog(str(tmp_path))
    log.record(update("a", "accepted"))
    log.sync()
    log.record(update("a", "succeeded", stdout="out"))
    log.record(update("b", "running"))
    log.close()
    again = store.TaskLog(str(tmp_path))
    assert json.loads(again.get("a") or b"")["state"] == "succeeded"
    assert [u["id"] for u in again.unfinished()] == ["b"]
    assert again.get("zzz") is None


def test_task_log_is_bounded_and_compacts(tmp_path: Path) -> None:
    log = store.TaskLog(str(tmp_path), remember=50)
    for i in range(500):
        log.record(update(f"t{i}", "succeeded", stdout="x" * 100))
    assert log.get("t0") is None and log.get("t499") is not None
    lines = (tmp_path / store.FILE_NAME).read_text().splitlines()
    assert len(lines) <= 2 * 50 + 1
    log.close()
    assert store.TaskLog(str(tmp_path), remember=50).get("t450") is not None


def test_task_log_keeps_output_only_for_recent_ids(tmp_path: Path) -> None:
    log = store.TaskLog(None)
    for i in range(store.KEEP_OUTPUT + 10):
        log.record(update(f"t{i}", "succeeded", stdout="out", stderr="err"))
    old = json.loads(log.get("t0") or b"")
    recent = json.loads(log.get(f"t{store.KEEP_OUTPUT + 9}") or b"")
    assert "stdout" not in old and old["truncated"] is True and old["state"] == "succeeded"
    assert recent["stdout"] == "out"


def test_task_log_survives_a_torn_line_and_an_unusable_dir(tmp_path: Path) -> None:
    (tmp_path / store.FILE_NAME).write_bytes(
        json.dumps(update("a", "succeeded")).encode() + b'\n{"v":1,"id":"b","sta')
    assert store.TaskLog(str(tmp_path)).get("a") is not None
    blocker = tmp_path / "file"
    blocker.write_text("")
    memory_only = store.TaskLog(str(blocker / "sub"))
    assert not memory_only.persistent
    memory_only.record(update("x", "accepted"))
    assert memory_only.get("x") is not None


# --- identity --------------------------------------------------------------------------------

def fake_sys(root: Path, uuid: str = "", macs: dict[str, str] | None = None) -> Path:
    dmi = root / "sys/class/dmi/id"
    dmi.mkdir(parents=True)
    (dmi / "product_uuid").write_text(uuid + "\n")
    (dmi / "sys_vendor").write_text("QEMU\n")
    for name, mac in (macs or {}).items():
        iface = root / "sys/class/net" / name
        iface.mkdir(parents=True)
        (iface / "address").write_text(mac + "\n")
        if not name.startswith("virt"):
            (iface / "device").mkdir()
    return root


def test_node_id_prefers_dmi_uuid_then_mac_then_hostname(tmp_path: Path) -> None:
    assert identity.derive_node_id(str(fake_sys(tmp_path / "a", "4C4C4544-0042-3510"))) == \
        "4c4c4544-0042-3510"
    bogus = fake_sys(tmp_path / "b", "03000200-0400-0500-0006-000700080009",
                     {"lo": "00:00:00:00:00:00", "virt0": "aa:aa:aa:aa:aa:aa",
                      "eth1": "52:54:00:AB:CD:EF"})
    assert identity.derive_node_id(str(bogus)) == "52:54:00:ab:cd:ef"
    empty = fake_sys(tmp_path / "c")
    assert identity.derive_node_id(str(empty)) == \
        identity.normalise_node_id(__import__("os").uname().nodename)


def test_facts_catalog(tmp_path: Path) -> None:
    root = fake_sys(tmp_path, "abc", {"eth0": "52:54:00:00:00:01"})
    (root / "proc").mkdir()
    (root / "proc/meminfo").write_text("MemTotal:       2048 kB\n")
    facts = identity.facts(str(root))
    assert facts["macs"] == {"eth0": "52:54:00:00:00:01"}
    assert facts["mem_bytes"] == 2048 * 1024 and facts["dmi"]["vendor"] == "QEMU"
    assert facts["dmi"]["product_uuid"] == "abc"
    assert {"hostname", "kernel", "arch", "ips", "cpus"} <= set(facts)
    live = identity.facts()
    assert live["kernel"] and isinstance(live["ips"], dict)


# --- configuration ----------------------------------------------------------------------------

def test_layers_in_order(tmp_path: Path) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text('broker = "mqtt://file:1883"\nprefix = "fromfile"\nparallel = 2\n'
                    'node = "file-node"\n')
    cmdline = "quiet edgerun.broker=mqtt://kernel:1 edgerun.node=kernel-node"
    cfg = config.load(["--config", str(toml)], {}, cmdline)
    assert (cfg.broker.host, cfg.node, cfg.prefix, cfg.parallel) == \
        ("kernel", "kernel-node", "fromfile", 2)
    env = {"EDGERUN_NODE": "env-node", "EDGERUN_PARALLEL": "3"}
    cfg = config.load(["--config", str(toml)], env, cmdline)
    assert (cfg.node, cfg.parallel) == ("env-node", 3)
    cfg = config.load(["--config", str(toml), "--node", "flag-node", "--parallel", "4"], env,
                      cmdline)
    assert (cfg.node, cfg.parallel) == ("flag-node", 4)


def test_broker_url_errors_never_show_the_password() -> None:
    for url in ("ftp://user:s3cret@h", "mqtt://user:s3cret@h:port", "mqtt://user:s3cret@"):
        with pytest.raises(ConfigError) as info:
            parse_broker_url(url, ("mqtt",))
        assert "s3cret" not in str(info.value) and "user:***@" in str(info.value)


def test_broker_url_forms() -> None:
    url = parse_broker_url("mqtts://u%40x:p%3Aw@[::1]/", ("mqtt", "mqtts"))
    assert (url.host, url.port, url.username, url.password, url.tls) == \
        ("::1", 8883, "u@x", "p:w", True)
    assert str(url) == "mqtts://u@x:***@[::1]:8883/"
    assert kernel_params('a edgerun.node=x "edgerun.prefix=p q" edgerun.state-dir=/s') == \
        {"node": "x", "prefix": "p q", "state_dir": "/s"}


@pytest.mark.parametrize("argv, env, text, needle", [
    ([], {}, None, "no broker"),
    (["--broker", "http://h"], {}, None, "scheme must be one of"),
    (["--broker", "mqtt://"], {}, None, "no host"),
    (["--broker", "mqtt://h:notaport"], {}, None, "bad broker URL"),
    (["--broker", "mqtt://h", "--node", "bad node"], {}, None, "`node`"),
    (["--broker", "mqtt://h", "--parallel", "0"], {}, None, "`parallel`"),
    (["--broker", "mqtt://h", "--parallel", "many"], {}, None, "must be an integer"),
    (["--broker", "mqtt://h"], {"EDGERUN_KEEPALIVE": "x"}, None, "EDGERUN_KEEPALIVE"),
    (["--broker", "mqtt://h", "--prefix", "a/b"], {}, None, "`prefix`"),
    (["--broker", "mqtt://h", "--ca-file", "/no/such"], {}, None, "no such file"),
    (["--bogus-flag"], {}, None, "unrecognized arguments"),
    ([], {}, "broker = 1", "must be a string"),
    ([], {}, "brokr = 'mqtt://h'", "unknown key `brokr`"),
    ([], {}, "broker = ", "not valid TOML"),
])
def test_config_errors_are_one_line(tmp_path: Path, argv: list[str], env: dict[str, str],
                                    text: str | None, needle: str) -> None:
    if text is not None:
        (tmp_path / "c.toml").write_text(text)
        argv = [*argv, "--config", str(tmp_path / "c.toml")]
    with pytest.raises(ConfigError) as info:
        config.load(argv, env, "")
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_bad_config_exits_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text("[[[")
    for args in (["--config", str(tmp_path / "c.toml")], ["--broker", "ftp://x"],
                 ["--config", str(tmp_path / "missing.toml")]):
        done = subprocess.run([sys.executable, "-m", "edgerun.agent", *args], capture_output=True,
                              text=True, cwd=ROOT, timeout=60, env={"PATH": "/usr/bin:/bin"})
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        assert done.stderr.startswith("edgerun-agent: error: ")


def test_version_flag() -> None:
    done = subprocess.run([sys.executable, "-m", "edgerun.agent", "--version"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("edgerun-agent ")


# --- back-off -----------------------------------------------------------------------------

def test_backoff_is_capped_exponential_with_jitter() -> None:
    assert backoff_delay(0, rand=lambda: 0.0) == 0.25
    assert backoff_delay(0, rand=lambda: 1.0) == 0.5
    assert backoff_delay(3, rand=lambda: 0.0) == 2.0
    assert backoff_delay(100, rand=lambda: 1.0) == 30.0
    assert backoff_delay(100, rand=lambda: 0.0) == 15.0
    assert len({backoff_delay(5) for _ in range(20)}) > 1
    with pytest.raises(ValueError):
        backoff_delay(-1)


def test_backoff_wait_ends_at_once_on_stop() -> None:
    stop = threading.Event()
    backoff = Backoff(stop, base=60, cap=60)
    threading.Timer(0.1, stop.set).start()
    started = time.monotonic()
    assert backoff.wait() is True
    assert time.monotonic() - started < 30


def test_paho_socket_errors_do_not_load_openssl() -> None:
    # paho evaluates `except ssl.SSLWantReadError` at every socket error (a would-block
    # read here); a plain mqtt:// agent must not load OpenSSL for that, a TLS one must
    # get the real classes once ssl is loaded
    script = """
import socket, sys
import edgerun.agent
import paho.mqtt.client as mqtt
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
here, there = socket.socketpair()
here.setblocking(False)
client._sock = here
try:
    client._sock_recv(1)
except BlockingIOError:
    pass
idle = "_ssl" in sys.modules or "_hashlib" in sys.modules
import ssl
context = ssl.create_default_context()
real = mqtt.ssl.SSLWantReadError is ssl.SSLWantReadError
print(idle, "_ssl" in sys.modules, real)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True", "True"]


def test_a_command_that_closes_its_pipes_and_lives_on_still_times_out_and_cancels() -> None:
    """After both pipes close the runner waits for the exit itself (a pidfd where there is
    one): the deadline and a cancel still end the command there."""
    from edgerun.agent.outcome import Control
    from edgerun.agent.shell import run_shell
    from edgerun.protocol import ShellTask

    said: list[str] = []
    timed = run_shell(ShellTask(id="closes-1", command="exec >&- 2>&-; sleep 30", timeout=0.5),
                      Control.for_timeout(0.5), lambda _s, _d: True, None,
                      lambda: said.append("running"))
    assert timed.state == "timed_out" and said == ["running"]
    control = Control.for_timeout(60)
    threading.Timer(0.3, control.stop, ("canceled by the test",)).start()
    canceled = run_shell(ShellTask(id="closes-2", command="exec >&- 2>&-; sleep 30",
                                   timeout=60), control, lambda _s, _d: True)
    assert canceled.state == "canceled"
    assert canceled.fields["error"].message == "canceled by the test"
    quick = run_shell(ShellTask(id="closes-3", command="exec >&- 2>&-; exit 3", timeout=60),
                      Control.for_timeout(60), lambda _s, _d: True)
    assert quick.fields["exit_code"] == 3
