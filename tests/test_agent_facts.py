"""Facts that change after the agent came online (a late DHCP lease, a new host name,
here a DMI field; a label or custom fact of the facts directory) are published as a new
retained online status; unchanged ones are not. The facts directory's files and
executables, and every hostile one: bounded, logged once, never stopping the agent."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from edgerun.agent import config, factsd, identity
from edgerun.agent.core import FACTS_CHECK_S, Agent

from .brokers import Mosquitto, wait_until
from .fleet_kit import make_sys_root
from .mqttkit import AgentProcess, Observer, shell


def test_changed_facts_are_published_again(mosquitto: Mosquitto, observer: Observer,
                                           tmp_path: Path) -> None:
    root = make_sys_root(tmp_path / "root", vendor="Before Inc", product="P1",
                         macs={"eth0": "52:54:00:00:00:01"})
    cfg = config.load(["--broker", mosquitto.url, "--node", "node-f",
                       "--state-dir", str(tmp_path / "state")], {}, "")
    agent = Agent(cfg, sys_root=str(root))
    thread = threading.Thread(target=agent.run)
    thread.start()
    try:
        first = observer.wait("status", node="node-f", state="online")[0]
        assert first["facts"]["dmi"]["vendor"] == "Before Inc"
        # nothing changed: after two checks there is still one online status
        assert not agent.stopping.wait(2 * FACTS_CHECK_S + 1)
        assert len(observer.of("status", node="node-f", state="online")) == 1
        (root / "sys/class/dmi/id/sys_vendor").write_text("After Inc\n")
        statuses = observer.wait("status", timeout=4 * FACTS_CHECK_S, count=2, node="node-f",
                                 state="online")
        assert statuses[-1]["facts"]["dmi"]["vendor"] == "After Inc"
        assert statuses[-1]["facts"]["macs"] == {"eth0": "52:54:00:00:00:01"}
    finally:
        agent.stop()
        thread.join(30)


def _replace(path: Path, text: str) -> None:
    """Write `path` at once, as an operator's tool should (a dot name is not read)."""
    tmp = path.with_name("." + path.name)
    tmp.write_text(text)
    os.replace(tmp, path)


def test_a_label_or_custom_fact_change_is_published_again(
        mosquitto: Mosquitto, observer: Observer, tmp_path: Path) -> None:
    facts = tmp_path / "facts.d"
    facts.mkdir()
    _replace(facts / "rack.json", '{"labels": {"rack": "r1"}}')
    cfg = config.load(["--broker", mosquitto.url, "--node", "node-l", "--state-dir",
                       str(tmp_path / "state"), "--facts-dir", str(facts),
                       "--label", "role=db"], {}, "")
    with running_agent(cfg):
        first = observer.wait("status", node="node-l", state="online")[0]
        assert first["facts"]["labels"] == {"rack": "r1", "role": "db"}
        assert "custom" not in first["facts"]
        _replace(facts / "rack.json", '{"labels": {"rack": "r2"}}')
        statuses = observer.wait("status", timeout=4 * FACTS_CHECK_S, count=2, node="node-l",
                                 state="online")
        assert statuses[-1]["facts"]["labels"] == {"rack": "r2", "role": "db"}
        executable(facts / "probe", 'echo \'{"temp": 41}\'')
        statuses = observer.wait("status", timeout=4 * FACTS_CHECK_S, count=3, node="node-l",
                                 state="online")
        assert statuses[-1]["facts"]["custom"] == {"temp": 41}
        assert statuses[-1]["facts"]["labels"] == {"rack": "r2", "role": "db"}
        (facts / "rack.json").unlink()
        statuses = observer.wait("status", timeout=4 * FACTS_CHECK_S, count=4, node="node-l",
                                 state="online")
        assert statuses[-1]["facts"]["labels"] == {"role": "db"}


def test_a_hanging_executable_holds_up_no_task(mosquitto: Mosquitto, observer: Observer,
                                               tmp_path: Path) -> None:
    """Executables run on the agent's main thread, never the MQTT or dispatcher thread:
    while one hangs (for its whole 60 s timeout) tasks are taken and answered."""
    facts = tmp_path / "facts.d"
    facts.mkdir()
    started = tmp_path / "started"
    cfg = config.load(["--broker", mosquitto.url, "--node", "node-h", "--state-dir",
                       str(tmp_path / "state"), "--facts-dir", str(facts),
                       "--facts-timeout", "60"], {}, "")
    with running_agent(cfg) as agent:
        observer.wait("status", node="node-h", state="online")
        executable(facts / "hang", f"touch {started}; sleep 4326.5")
        assert wait_until(started.exists, 4 * FACTS_CHECK_S)
        observer.send("node-h", shell("during", "echo fine"))
        assert observer.final("during", 30)["stdout"] == "fine\n"
        assert running("sleep 4326.5")  # still hanging: the task did not wait for it
        agent.stop()  # and stopping ends it at once, not after its timeout
    assert wait_until(lambda: not running("sleep 4326.5"), 10)


# --- the facts directory -------------------------------------------------------------------
@contextmanager
def running_agent(cfg: config.AgentConfig, sys_root: str = "/") -> Iterator[Agent]:
    """An agent in this process, on a thread; stopped (and joined) on the way out."""
    agent = Agent(cfg, sys_root=sys_root)
    thread = threading.Thread(target=agent.run, name=f"agent-{cfg.node}")
    thread.start()
    try:
        yield agent
    finally:
        agent.stop()
        thread.join(30)
        assert not thread.is_alive(), "the agent did not stop"


def executable(path: Path, script: str) -> Path:
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)
    return path


def read(directory: Path, timeout: float = 30.0,
         stopping: threading.Event | None = None) -> factsd.Found:
    return factsd.read_dir(str(directory), timeout, factsd.Runner(stopping))


def running(needle: str) -> list[int]:
    """Pids of living processes whose command line holds `needle`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if needle.encode() in cmdline:
            found.append(int(entry))
    return found


def problem(found: factsd.Found, directory: Path, name: str) -> str:
    return found.problems[str(directory / name)]


def test_json_files_and_executables_are_merged_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "10-base.json").write_text('{"asset": "AT-1", "room": "A", "nested": {"x": 1}}')
    executable(tmp_path / "20-probe", 'echo \'{"room": "B", "probe": [1, 2.5, true, null]}\'')
    (tmp_path / "30-last.json").write_text('{"asset": "AT-2", "labels": {"rack": "r1"}}')
    (tmp_path / "README").write_text("not JSON, not executable: skipped")
    (tmp_path / ".hidden.json").write_text("{broken")
    (tmp_path / "old.json~").write_text("{broken")
    (tmp_path / "subdir").mkdir()
    found = read(tmp_path)
    assert found.problems == {}
    assert found.custom == {"asset": "AT-2", "room": "B", "nested": {"x": 1},
                            "probe": [1, 2.5, True, None]}
    assert found.labels.labels == (("rack", "r1"),)


def test_a_missing_directory_is_no_problem(tmp_path: Path) -> None:
    found = read(tmp_path / "absent")
    assert found == factsd.Found()


def test_a_file_of_10_mb_is_not_read(tmp_path: Path) -> None:
    with open(tmp_path / "big.json", "wb") as fh:
        fh.write(b'{"x": "' + b"a" * (10 * 1024 * 1024) + b'"}')
    (tmp_path / "ok.json").write_text('{"ok": 1}')
    found = read(tmp_path)
    assert found.custom == {"ok": 1}
    assert f"{10 * 1024 * 1024 + 9} bytes; the limit is 32768" in \
        problem(found, tmp_path, "big.json")


def test_a_fifo_or_a_device_does_not_block(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    found = read(tmp_path)
    assert problem(found, tmp_path, "fifo.json") == "not a regular file"
    assert problem(found, tmp_path, "zero.json") == "not a regular file"


@pytest.mark.parametrize("body, why", [
    (b"", "not JSON"),
    (b"hello", "not JSON"),
    (b"[1, 2]", "must be one JSON object, not list"),
    (b'"text"', "must be one JSON object, not str"),
    (b'{"a": NaN}', "NaN is not JSON"),
    (b'{"a": 1e999999}', "cannot be sent"),
    (b'{"a": "\\ud800"}', "cannot be sent"),
    (b"\xff\xfe{}", "not JSON"),
    (b"[" * 15_000 + b"]" * 15_000, "nested too deeply"),
    (b'{"a": ' + b"9" * 5000 + b"}", "not JSON"),
])
def test_a_file_that_is_no_json_object(tmp_path: Path, body: bytes, why: str) -> None:
    (tmp_path / "bad.json").write_bytes(body)
    (tmp_path / "good.json").write_text('{"good": true}')
    found = read(tmp_path)
    assert found.custom == {"good": True}
    assert why in problem(found, tmp_path, "bad.json")


def test_an_executable_that_hangs_is_killed_with_its_children(tmp_path: Path) -> None:
    executable(tmp_path / "hang", "sleep 4321.5 & sleep 4321.25; echo '{\"late\": 1}'")
    executable(tmp_path / "quick", "echo '{\"quick\": 1}'")
    found = read(tmp_path, timeout=1.0)
    assert found.custom == {"quick": 1}
    assert problem(found, tmp_path, "hang") == "did not finish within 1 s; killed"
    assert wait_until(lambda: not running("sleep 4321."), 10), running("sleep 4321.")


def test_an_executable_that_prints_100_mb_is_stopped_at_the_limit(tmp_path: Path) -> None:
    executable(tmp_path / "flood", "head -c 100000000 /dev/zero; sleep 4322.5")
    found = read(tmp_path)
    assert problem(found, tmp_path, "flood") == f"printed more than {factsd.MAX_SOURCE_BYTES} " \
                                               "bytes; killed"
    assert wait_until(lambda: not running("sleep 4322.5"), 10)


def test_an_executable_that_prints_no_json(tmp_path: Path) -> None:
    executable(tmp_path / "words", "echo hello world")
    executable(tmp_path / "silent", "true")
    found = read(tmp_path)
    assert problem(found, tmp_path, "words").startswith("not JSON")
    assert problem(found, tmp_path, "silent").startswith("not JSON")
    assert found.custom == {}


def test_an_executable_that_exits_1_counts_for_nothing(tmp_path: Path) -> None:
    executable(tmp_path / "fails", "echo '{\"half\": 1}'; echo 'no inventory service' >&2; exit 1")
    executable(tmp_path / "killed", "echo '{\"half\": 2}'; kill -9 $$")
    (tmp_path / "noexec").write_bytes(b"\x7fELF not really")
    (tmp_path / "noexec").chmod(0o755)
    found = read(tmp_path)
    assert found.custom == {}
    assert problem(found, tmp_path, "fails") == "exited with status 1: no inventory service"
    assert problem(found, tmp_path, "killed") == "was killed by signal 9"
    assert problem(found, tmp_path, "noexec").startswith("cannot run: ")


def test_an_executable_whose_child_keeps_stdout_open_is_not_waited_for(tmp_path: Path) -> None:
    # it exits at once; the sleep it left holds the pipe: read() must not wait 60 s for it
    executable(tmp_path / "leaves", "sleep 4323.5 & echo '{\"done\": true}'")
    found = read(tmp_path, timeout=60.0)
    assert found.problems == {} and found.custom == {"done": True}
    assert wait_until(lambda: not running("sleep 4323.5"), 10)


def test_stopping_ends_a_hanging_executable(tmp_path: Path) -> None:
    executable(tmp_path / "hang", "sleep 4324.5")
    stopping = threading.Event()
    threading.Timer(0.5, stopping.set).start()
    found = read(tmp_path, timeout=120.0, stopping=stopping)
    assert problem(found, tmp_path, "hang") == "the agent is stopping; killed"
    assert wait_until(lambda: not running("sleep 4324.5"), 10)


def test_entries_and_total_size_are_bounded(tmp_path: Path) -> None:
    for i in range(factsd.MAX_ENTRIES + 6):
        (tmp_path / f"f{i:03d}.json").write_text(json.dumps({f"k{i}": i}))
    found = read(tmp_path)
    assert len(found.custom) == factsd.MAX_ENTRIES and "k0" in found.custom
    assert f"{factsd.MAX_ENTRIES + 6} entries" in found.problems[str(tmp_path)]
    big = tmp_path / "big"
    big.mkdir()
    for name in ("a", "b", "c"):
        (big / f"{name}.json").write_text(json.dumps({name: "x" * 30_000}))
    found = read(big)
    assert sorted(found.custom) == ["a", "b"]
    assert "would exceed" in problem(found, big, "c.json")


def test_hostile_facts_never_stop_the_agent(mosquitto: Mosquitto, observer: Observer,
                                            tmp_path: Path) -> None:
    """Every nasty case at once in a live agent's facts directory: it comes online with
    the good facts, says what is wrong once (not at every check), and runs tasks while
    an executable hangs."""
    facts = tmp_path / "facts.d"
    facts.mkdir()
    runs = tmp_path / "runs"
    with open(facts / "big.json", "wb") as fh:
        fh.truncate(10 * 1024 * 1024)
    executable(facts / "hang", f"echo run >> {runs}; sleep 4325.5")
    executable(facts / "flood", "head -c 100000000 /dev/zero")
    executable(facts / "nojson", "echo hello")
    executable(facts / "exit1", "echo '{}'; exit 1")
    (facts / "many-labels.json").write_text(json.dumps(
        {"labels": {f"k{i:05d}": "v" for i in range(10_000)}}))
    (facts / "labels.json").write_text(json.dumps(
        {"labels": {"rack": "r1", "bad key": "x", "role": "a b"}}))
    (facts / "good.json").write_text('{"asset": "AT-7"}')
    agent = AgentProcess(mosquitto.url, "hostile-facts", tmp_path / "agent", "--facts-dir",
                         str(facts), "--facts-timeout", "2").start()
    status = agent.wait_online(observer, timeout=30)
    assert status["facts"]["custom"] == {"asset": "AT-7"}
    assert status["facts"]["labels"] == {"rack": "r1"}
    observer.send("hostile-facts", shell("t1", "echo alive"))
    assert observer.final("t1", 30)["stdout"] == "alive\n"

    def checks() -> int:
        return len(runs.read_text().splitlines()) if runs.exists() else 0
    # the fourth check started: three were read and logged
    assert wait_until(lambda: checks() >= 4, 60), agent.log()[-3000:]
    log = agent.log()
    for needle in ("hang: did not finish within 2 s; killed", "flood: printed more than",
                   "big.json: 10485760 bytes; the limit is", "nojson: not JSON",
                   "exit1: exited with status 1", "many-labels.json: 1", "'bad key'", "'a b'"):
        assert log.count(needle) == 1, (needle, log[-3000:])
    assert len(observer.of("status", node="hostile-facts", state="online")) == 1
    assert agent.alive()


# --- waiting for the network (the discovery image starts the agent while DHCP runs) ------
ROUTE_HEADER = ("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\t"
                "Window\tIRTT\n")


@pytest.mark.parametrize("route, ipv6, up", [
    ("eth0\t00000000\t0202000A\t0003\t0\t0\t101\t00000000\t0\t0\t0\n", "", True),
    ("eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n", "", False),  # a subnet
    ("eth0\t00000000\t0202000A\t0002\t0\t0\t101\t00000000\t0\t0\t0\n", "", False),  # not up
    ("", "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
         "fe800000000000000000000000000001 00000400 00000001 00000000 00000003 eth0\n", True),
    # the kernel's own unreachable default on lo, and a reject route
    ("", "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
         "00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo\n", False),
    ("", "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
         "00000000000000000000000000000000 ffffffff 00000001 00000000 00000201 eth0\n", False),
    ("garbage\nmore garbage with\tfields 00000000 zz 1 2 3 00000000\n", "x y\n", False),
])
def test_default_route_is_read_from_proc(tmp_path: Path, route: str, ipv6: str,
                                         up: bool) -> None:
    net = tmp_path / "proc/net"
    net.mkdir(parents=True)
    (net / "route").write_text(ROUTE_HEADER + route)
    (net / "ipv6_route").write_text(ipv6)
    assert identity.default_route(str(tmp_path)) is up
    assert identity.default_route(str(tmp_path / "nothing")) is False


def test_the_agent_waits_for_a_default_route_before_it_connects(
        mosquitto: Mosquitto, observer: Observer, tmp_path: Path) -> None:
    root = make_sys_root(tmp_path / "root", macs={"eth0": "52:54:00:00:00:09"})
    (root / "proc/net").mkdir(parents=True)
    (root / "proc/net/route").write_text(ROUTE_HEADER)
    cfg = config.load(["--broker", mosquitto.url, "--node", "node-w", "--state-dir",
                       str(tmp_path / "state"), "--facts-dir", "", "--net-wait", "60"], {}, "")
    with running_agent(cfg, sys_root=str(root)) as agent:
        # it waits: no connection, so neither a session nor a status, however long
        assert not wait_until(agent.conn.connected.is_set, 2)
        assert observer.of("status", node="node-w") == []
        (root / "proc/net/route").write_text(
            ROUTE_HEADER + "eth0\t00000000\t0202000A\t0003\t0\t0\t101\t00000000\t0\t0\t0\n")
        observer.wait("status", node="node-w", state="online")


def test_without_a_route_it_connects_anyway_after_net_wait(
        mosquitto: Mosquitto, observer: Observer, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    root = make_sys_root(tmp_path / "root")
    cfg = config.load(["--broker", mosquitto.url, "--node", "node-n", "--state-dir",
                       str(tmp_path / "state"), "--facts-dir", "", "--net-wait", "0.5"], {}, "")
    with caplog.at_level("WARNING", logger="edgerun.agent.core"), \
            running_agent(cfg, sys_root=str(root)):
        observer.wait("status", node="node-n", state="online")
    assert "no default route after 0.5 s; connecting anyway" in caplog.text


def test_stop_while_waiting_for_the_network(mosquitto: Mosquitto, tmp_path: Path) -> None:
    root = make_sys_root(tmp_path / "root")
    cfg = config.load(["--broker", mosquitto.url, "--node", "node-s", "--state-dir",
                       str(tmp_path / "state"), "--facts-dir", "", "--net-wait", "600"], {}, "")
    with running_agent(cfg, sys_root=str(root)) as agent:
        assert not wait_until(agent.conn.connected.is_set, 1)
    # running_agent asserted it stopped (within its join timeout, far below 600 s)
