"""The one-file static agent (`./build.sh binary`) on the host: it is the installed agent.

The same tasks go to the frozen binary and to the installed `edgerun-agent`
over one private Mosquitto, and their updates must match field for field. The
binary must also run with no C library at all (a chroot holding only itself),
speak TLS, verify signed tasks with the frozen pure-Python Ed25519, find
certifi's CA bundle, and leave its tasks the environment it was started with.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import ssl
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import pytest

from edgerun.signing import Signer, generate_keypair

from .brokers import Mosquitto, free_port, mosquitto_binary, wait_port, wait_until
from .httpkit import PAYLOAD, PAYLOAD_SHA, Handler, Server, http_server
from .mqttkit import AgentProcess, Observer, shell
from .tlskit import CA

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "images" / "out"
BINARY = OUT / "edgerun-agent"
BUILD_TIMEOUT = 1800
INSTALLED = Path(sys.executable).parent / "edgerun-agent"
# What both agents get, so that their tasks' environments can be compared.
BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(BUILD_TIMEOUT),
              pytest.mark.skipif(mosquitto_binary() is None, reason="needs a private mosquitto")]


# --- shared with tests/test_image_boot.py ----------------------------------------------
def prerequisites(*groups: str) -> None:
    """Install (as root) or skip, naming the Debian packages that are missing."""
    done = subprocess.run([str(ROOT / "images" / "prereqs.sh"), *groups], capture_output=True,
                          text=True, timeout=900)
    if done.returncode == 3:
        pytest.skip(done.stderr.strip().replace("\n", "; "))
    assert done.returncode == 0, done.stderr


def built_image() -> dict[str, Any]:
    """Build (or reuse) the image for a boot test; its manifest. Skips, naming the
    Debian package, when something the boot needs is missing."""
    prerequisites("binary", "image", "vm")
    if mosquitto_binary() is None:
        pytest.skip("mosquitto not found: apt-get install mosquitto")
    build("image")
    return dict(json.loads((OUT / "manifest.json").read_text()))


def build(target: str) -> str:
    """`./build.sh binary` or `./build.sh image`; its report (stderr)."""
    done = subprocess.run([str(ROOT / "build.sh"), target], capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT, cwd=ROOT)
    if done.returncode == 3:  # prerequisites missing and not installable here
        pytest.skip(done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, f"./build.sh {target} failed:\n{done.stderr[-4000:]}"
    return done.stderr


def load_images_module(name: str) -> ModuleType:
    """images/<name>.py (images/ is not a package)."""
    if f"edgerun_images_{name}" in sys.modules:  # once per session: vm.py keeps its KVM probe
        return sys.modules[f"edgerun_images_{name}"]
    spec = importlib.util.spec_from_file_location(f"edgerun_images_{name}",
                                                  ROOT / "images" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# --- the two agents ------------------------------------------------------------------------
class FrozenAgent(AgentProcess):
    """The static binary, or with `command` the installed console script, as a process."""

    command: ClassVar[tuple[str, ...]] = (str(BINARY),)

    def start(self) -> FrozenAgent:
        cmd = [*self.command, "--broker", self.url, "--node", self.node,
               "--state-dir", str(self.dir / "state"), "--log-level", "debug", *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=self.dir,
                                         env={**BASE_ENV, **self.env})
        return self


class InstalledAgent(FrozenAgent):
    command = (str(INSTALLED),)


@pytest.fixture(scope="module")
def binary() -> Path:
    prerequisites("binary")
    report = build("binary")
    assert "edgerun-agent:" in report and "MiB" in report  # the build states the size
    return BINARY


def test_version_is_the_installed_agents(binary: Path) -> None:
    frozen = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                            check=True)
    installed = subprocess.run([str(INSTALLED), "--version"], capture_output=True, text=True,
                               check=True)
    assert frozen.stdout == installed.stdout
    assert frozen.stdout.startswith("edgerun-agent ")


def test_binary_is_static_and_leaves_out_the_other_parts(binary: Path) -> None:
    data = binary.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2  # ELF64
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    kinds = {struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)}
    assert 3 not in kinds and 2 not in kinds  # no PT_INTERP, no PT_DYNAMIC: static
    contents = set((OUT / "edgerun-agent.contents").read_text().split())
    for present in ("edgerun.agent.main", "edgerun.mqtt", "paho.mqtt.client", "requests", "urllib3",
                    "certifi", "certifi/cacert.pem", "edgerun.ed25519"):
        assert present in contents, present
    top = {name.split(".")[0].split("/")[0] for name in contents}
    for absent in ("pika", "amqtt", "prometheus_client", "cryptography",
                   "tkinter", "unittest", "pydoc", "lib2to3", "distutils"):
        assert absent not in top, absent
    for name in contents:
        assert not name.startswith(("edgerun.scheduler", "edgerun.bridge")), name


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare(1) for a chroot with its own /proc")
def test_runs_with_no_c_library_at_all(binary: Path, mosquitto: Mosquitto, observer: Observer,
                                       tmp_path: Path) -> None:
    # a root holding nothing but the binary, /tmp and /proc: no libc, no /bin/sh, no /etc
    jail = tmp_path / "jail"
    (jail / "tmp").mkdir(parents=True)
    (jail / "proc").mkdir()
    shutil.copy2(binary, jail / "edgerun-agent")
    script = (f"mount -t proc proc {jail}/proc && exec chroot {jail} /edgerun-agent "
              f"--broker {mosquitto.url} --node jailed --state-dir /state")
    log = open(tmp_path / "jail.log", "wb")  # noqa: SIM115 - the process keeps it
    proc = subprocess.Popen(["unshare", "--mount", "sh", "-c", script], stdout=log, stderr=log)
    log.close()
    try:
        status = observer.wait("status", 60, node="jailed", state="online")[-1]
        assert status["facts"]["hostname"]
        # a task that runs the binary itself: argv, as there is no shell in there, and
        # stdin given, as there is no /dev/null either
        observer.send("jailed", shell("inside", ["/edgerun-agent", "--version"], stdin=""))
        final = observer.final("inside", 60)
        assert final["state"] == "succeeded", final
        assert final["stdout"].startswith("edgerun-agent ")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (tmp_path / "jail.log").read_text()
    assert observer.wait("status", 30, node="jailed", state="offline")[-1]["at"]
    assert sorted(os.listdir(jail / "tmp")) == []  # both unpackers cleaned up


def test_tasks_get_the_environment_the_agent_was_started_with(
        binary: Path, mosquitto: Mosquitto, observer: Observer, tmp_path: Path) -> None:
    extra = {"LD_LIBRARY_PATH": "/opt/site/lib", "SITE_MARK": "1"}
    outputs = {}
    for node, kind in (("env-frozen", FrozenAgent), ("env-installed", InstalledAgent)):
        agent = kind(mosquitto.url, node, tmp_path / node, env=extra).start()
        agent.wait_online(observer, 60)
        observer.send(node, shell(f"{node}-env", ["env"], cwd="/tmp"))
        final = observer.final(f"{node}-env", 60)
        assert final["state"] == "succeeded", (final, agent.log()[-2000:])
        outputs[node] = dict(line.split("=", 1) for line in final["stdout"].splitlines())
        # the task's own marker, by which the agent finds its processes (contain.py)
        assert outputs[node].pop("EDGERUN_TASK").endswith(f"/{node}-env")
        assert agent.terminate() == 0
    assert outputs["env-frozen"] == outputs["env-installed"] == {**BASE_ENV, **extra}


# --- the same tasks through both agents ---------------------------------------------------
def scenario(base: str, workdir: Path, signer: Signer) -> list[dict[str, Any]]:
    def task(task_id: str, **fields: Any) -> dict[str, Any]:
        return signer.sign({"v": 1, "kind": "task", "id": task_id, **fields})

    def fetch(task_id: str, path: str, **fields: Any) -> dict[str, Any]:
        return task(task_id, type="download", url=f"{base}{path}",
                    dest=str(workdir / "files" / task_id), **fields)

    return [
        task("exit3", type="shell", command="echo out; echo err >&2; exit 3"),
        task("ok-codes", type="shell", command="exit 3", ok_codes=[0, 3]),
        task("argv", type="shell", command=["/bin/sh", "-c", 'printf "%s" "$GREETING"; cat'],
             env={"GREETING": "hi "}, stdin="there", cwd="/tmp"),
        task("unicode", type="shell", command="printf 'caf\\303\\251 \\377\\n'"),
        task("timeout", type="shell", command="sleep 30", timeout=0.5),
        fetch("fetch", "/file", sha256=PAYLOAD_SHA, mode="0640"),
        fetch("redirect", "/redirect", sha256=PAYLOAD_SHA),
        fetch("mismatch", "/file", sha256="0" * 64),
        fetch("missing", "/missing"),
        fetch("too-large", "/file", max_bytes=1000),
        task("unknown", type="reboot"),
        {"v": 1, "kind": "task", "id": "unsigned", "type": "shell", "command": "true"},
    ]


FINAL = ("succeeded", "failed", "timed_out", "canceled", "rejected")


def finals(observer: Observer, node: str, task_id: str) -> int:
    return sum(1 for u in observer.updates(task_id) if u["node"] == node and u["state"] in FINAL)


def normalised(updates: list[dict[str, Any]], workdir: Path) -> list[dict[str, Any]]:
    out = []
    for update in updates:
        clean = {k: v for k, v in update.items() if k not in ("at", "duration_s", "node")}
        out.append(json.loads(json.dumps(clean).replace(str(workdir), "WORKDIR")))
    return out


def test_same_tasks_same_updates_as_the_installed_agent(
        binary: Path, mosquitto: Mosquitto, observer: Observer, tmp_path: Path) -> None:
    private_pem, public_key = generate_keypair()
    signer = Signer(private_pem)
    results = {}
    with http_server() as base:
        for node, kind in (("frozen", FrozenAgent), ("installed", InstalledAgent)):
            workdir = tmp_path / node
            agent = kind(mosquitto.url.replace("127.0.0.1", "localhost"), node, workdir,
                         "--public-key", public_key).start()
            agent.wait_online(observer, 60)
            tasks = scenario(base, workdir, signer)
            for message in tasks:
                observer.send(node, message)
            ids = list(dict.fromkeys(str(m["id"]) for m in tasks))
            for task_id in ids:
                assert wait_until(partial(finals, observer, node, task_id), 60), \
                    (task_id, agent.log()[-3000:])
            # a finished id sent again is not run again: its final update comes back
            observer.send(node, signer.sign({"v": 1, "kind": "task", "id": "argv",
                                             "type": "shell", "command": "echo again"}))
            assert wait_until(lambda: finals(observer, node, "argv") == 2, 30)  # noqa: B023
            assert agent.terminate() == 0, agent.log()[-3000:]
            results[node] = {i: normalised([u for u in observer.updates(i) if u["node"] == node],
                                           workdir) for i in ids}
            assert (workdir / "files" / "fetch").read_bytes() == PAYLOAD
            assert not (workdir / "files" / "mismatch").exists()
    assert results["frozen"] == results["installed"]
    frozen = results["frozen"]
    assert [u["state"] for u in frozen["argv"]] == ["accepted", "running", "succeeded",
                                                    "succeeded"]
    assert frozen["argv"][-1]["stdout"] == "hi there"
    assert frozen["fetch"][-1]["sha256"] == PAYLOAD_SHA
    assert frozen["unsigned"][-1]["error"]["code"] == "bad_signature"
    assert frozen["timeout"][-1]["state"] == "timed_out"


# --- TLS: mqtts with client certificates, https with certifi's bundle ----------------------
@contextmanager
def https_server(cert: Path, key: Path) -> Iterator[str]:
    server = Server(("127.0.0.1", 0), Handler)
    server.hits = {}
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_tls_broker_and_https_downloads(binary: Path, tmp_path: Path) -> None:
    ca = CA(tmp_path / "pki")
    server, client = ca.issue("broker", server=True), ca.issue("node-tls", server=False)
    port = free_port()
    extra = (f"listener {port} 127.0.0.1\ncafile {ca.path}\ncertfile {server.cert}\n"
             f"keyfile {server.key}\nrequire_certificate true\n")
    broker = Mosquitto(tmp_path / "mosquitto", extra=extra).start()
    wait_port(port)
    web = ca.issue("web", server=True)
    try:
        with Observer(broker.url) as observer, https_server(web.cert, web.key) as base:
            for node, env in (("certifi", {}), ("site-ca", {"REQUESTS_CA_BUNDLE": str(ca.path)})):
                agent = FrozenAgent(f"mqtts://127.0.0.1:{port}", node, tmp_path / node,
                                    "--ca-file", str(ca.path), "--cert-file", str(client.cert),
                                    "--key-file", str(client.key), env=env).start()
                agent.wait_online(observer, 60)
                observer.send(node, {"v": 1, "kind": "task", "id": f"{node}-get",
                                     "type": "download", "url": f"{base}/file",
                                     "dest": str(tmp_path / node / "file"),
                                     "sha256": PAYLOAD_SHA})
                final = observer.final(f"{node}-get", 90)
                if node == "certifi":
                    # certifi's bundle was found and used: our test CA is not in it
                    assert final["state"] == "failed", final
                    assert final["error"]["code"] == "download_failed", final
                    assert "certificate verify failed" in final["error"]["message"]
                else:
                    assert final["state"] == "succeeded", final
                    assert final["sha256"] == PAYLOAD_SHA
                assert agent.terminate() == 0
    finally:
        broker.stop()
