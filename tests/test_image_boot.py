"""Boot the discovery image in QEMU and drive its agent over a broker on the host.

`./build.sh image` builds the static agent, the kernel and the initramfs (or
finds them up to date). The VM has two NICs on two QEMU user-mode networks
(virtio-net and an e1000, so both the virtio and the Intel modules must load)
and SMBIOS identity of our choosing, and labels on the kernel command line; the
guest reaches the test's Mosquitto and HTTP server on the host's loopback as
10.0.2.2. One boot serves every test in
this file, in order; the figures (boot-to-online, RSS in the VM) go to
images/out/vm-report.json and the terminal.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .brokers import Mosquitto, wait_until
from .httpkit import PAYLOAD, PAYLOAD_SHA, http_server
from .mqttkit import Observer, shell
from .test_image_binary import BUILD_TIMEOUT, built_image, load_images_module

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "images" / "out"
ONLINE_TIMEOUT = 300  # TCG on a busy CI machine; under KVM it is seconds
TASK_TIMEOUT = 120
GUEST_HOST = "10.0.2.2"  # the host's 127.0.0.1 as QEMU's user network shows it

LABELS = {"rack": "r1", "role": "discovery", "asset": "AT-0042"}  # set per boot, as iPXE would

pytestmark = [pytest.mark.slow, pytest.mark.timeout(BUILD_TIMEOUT + 2 * ONLINE_TIMEOUT)]


@dataclass
class Booted:
    vm: Any
    observer: Observer
    node: str
    smbios: dict[str, str]
    macs: dict[str, str]
    http: str
    manifest: dict[str, Any]
    online_after_s: float
    report: dict[str, Any]

    def run(self, task_id: str, command: str) -> dict[str, Any]:
        self.observer.send(self.node, shell(task_id, command, timeout=60))
        final = self.observer.final(task_id, TASK_TIMEOUT)
        assert final["state"] == "succeeded", (final, self.vm.log()[-3000:])
        return final


@pytest.fixture(scope="module")
def image() -> dict[str, Any]:
    return built_image()


@pytest.fixture(scope="module")
def booted(image: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Booted]:
    vm_module = load_images_module("vm")
    work = tmp_path_factory.mktemp("vm")
    broker = Mosquitto(work / "mosquitto").start()
    node = f"vm-{uuid.uuid4().hex[:8]}"
    smbios = {"manufacturer": "edgerun-test", "product": "discovery-vm",
              "serial": f"SN-{uuid.uuid4().hex[:10]}", "uuid": str(uuid.uuid4())}
    macs = {"virtio-net-pci": "52:54:00:ed:9e:01", "e1000": "52:54:00:ed:9e:02"}
    nics = [vm_module.Nic("virtio-net-pci", macs["virtio-net-pci"]),
            vm_module.Nic("e1000", macs["e1000"], net="10.0.3.0/24")]
    append = (f"edgerun.broker=mqtt://{GUEST_HOST}:{broker.port} edgerun.node={node} "
              f"edgerun.labels={','.join(f'{k}={v}' for k, v in LABELS.items())}")
    with http_server() as http, Observer(broker.url) as observer:
        vm = vm_module.VM(append=append, nics=nics, smbios=smbios, memory_mb=512, cpus=2,
                          console=work / "console.log").start()
        started = vm.started_at
        try:
            online = wait_until(lambda: bool(observer.of("status", node=node, state="online")),
                                ONLINE_TIMEOUT, interval=0.05)
            assert online, f"never online; QEMU: {vm.qemu_output()}\nconsole:\n{vm.log()[-5000:]}"
            online_after = time.monotonic() - started
            port = http.rsplit(":", 1)[1]
            report = {"accel": vm.accel, "boot_to_online_s": round(online_after, 1),
                      "initramfs_bytes": (OUT / "initramfs.img").stat().st_size,
                      "agent_folder_bytes": _tree_bytes(AGENT_ROOT),
                      "kernel": image["kernel"]}
            yield Booted(vm, observer, node, smbios, macs, f"http://{GUEST_HOST}:{port}",
                         image, online_after, report)
        finally:
            vm.stop()
            broker.stop()
            (OUT / "vm-console.log").write_text(vm.log())


AGENT_ROOT = OUT / "edgerun-agent.root"


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def test_image_holds_what_the_boot_needs(image: dict[str, Any]) -> None:
    mk = load_images_module("mkinitramfs")
    entries = mk.read_cpio(mk.decompress((OUT / "initramfs.img").read_bytes()))
    assert entries["init"].kind == "file" and entries["init"].mode & 0o111
    assert entries["dev/console"].kind == "char" and entries["dev/console"].rdev == (5, 1)
    assert entries["bin/sh"].data == b"/bin/busybox"
    links = {name.rsplit("/", 1)[-1] for name, e in entries.items() if e.data == b"/bin/busybox"}
    assert {"init", "modprobe", "udhcpc", "uevent", "ip", "setsid", "awk"} <= links
    # the agent unwrapped: PyInstaller's folder run in place, glibc where the loader looks
    folder = "usr/lib/edgerun-agent"
    assert entries["usr/bin/edgerun-agent"].kind == "symlink"
    assert entries["usr/bin/edgerun-agent"].data == f"/{folder}/edgerun-agent".encode()
    for path in AGENT_ROOT.rglob("*"):
        rel = path.relative_to(AGENT_ROOT).as_posix()
        if path.is_symlink():
            assert entries[rel].data == os.readlink(path).encode(), rel
        elif path.is_file():
            assert entries[rel].data == path.read_bytes(), rel
    assert entries[f"{folder}/edgerun-agent.xpack"].kind == "file"  # OpenSSL, unpacked on use
    assert not any(name.startswith(f"{folder}/libssl") for name in entries)
    for lib in ("lib64/ld-linux-x86-64.so.2", "lib/x86_64-linux-gnu/libc.so.6"):
        target = entries[lib].data.decode().lstrip("/")
        assert entries[lib].kind == "symlink" and entries[target].kind == "file", lib
    assert entries["etc/ssl/certs/ca-certificates.crt"].data.count(b"BEGIN CERTIFICATE") > 100
    moddir = f"lib/modules/{image['kernel']}"
    dep = entries[f"{moddir}/modules.dep"].data.decode().splitlines()
    for line in dep:  # every module and every dependency it names is in the image
        for path in line.replace(":", " ").split():
            assert f"{moddir}/{path}" in entries, path
    # each module xz-compressed (busybox modprobe decompresses it): 4.6 MB instead of 20
    names = {p.rsplit("/", 1)[-1].removesuffix(".xz") for p in entries if p.endswith(".ko.xz")}
    assert not any(p.endswith(".ko") for p in entries)
    assert lzma.decompress(next(e.data for p, e in entries.items()
                                if p.endswith("/e1000.ko.xz")))[:4] == b"\x7fELF"
    for module in ("virtio_net.ko", "virtio_pci.ko", "e1000.ko", "e1000e.ko", "igb.ko",
                   "ixgbe.ko", "i40e.ko", "r8169.ko", "tg3.ko", "bnxt_en.ko", "mlx5_core.ko",
                   "vmxnet3.ko"):
        assert module in names, module
    aliases = entries[f"{moddir}/modules.alias"].data.decode()
    assert re.search(r"^alias pci:v00008086d0000100Esv\S* e1000$", aliases, re.M)  # QEMU's e1000


def online_status(booted: Booted) -> dict[str, Any]:
    return booted.observer.of("status", node=booted.node, state="online")[0]


def _leases(status: dict[str, Any]) -> int:
    ips = status["facts"]["ips"]
    return sum(any("." in a for a in addrs) for addrs in ips.values())


def test_node_comes_online_with_facts_read_inside_the_vm(booted: Booted) -> None:
    # the agent may come online before the second NIC's lease: it then publishes its
    # facts again once they changed (at most FACTS_CHECK_S later)
    assert wait_until(lambda: any(_leases(s) >= 2 for s in booted.observer.of(
        "status", node=booted.node, state="online")), 60), online_status(booted)
    status = next(s for s in booted.observer.of("status", node=booted.node, state="online")
              if _leases(s) >= 2)
    facts = status["facts"]
    assert facts["kernel"] == booted.manifest["kernel"]
    assert facts["arch"] == "x86_64" and facts["cpus"] == 2
    assert facts["mem_bytes"] < 600 * 1024 * 1024  # the VM's 512 MiB, not the host's memory
    assert facts["hostname"] == booted.node
    assert facts["dmi"] == {"product_uuid": booted.smbios["uuid"],
                            "serial": booted.smbios["serial"],
                            "vendor": booted.smbios["manufacturer"],
                            "product": booted.smbios["product"]}
    # both drivers loaded (virtio_net and e1000 are modules) and both NICs got a lease
    assert sorted(facts["macs"].values()) == sorted(booted.macs.values())
    by_mac = {mac: name for name, mac in facts["macs"].items()}
    virtio, e1000 = by_mac[booted.macs["virtio-net-pci"]], by_mac[booted.macs["e1000"]]
    v4 = {name: [a for a in facts["ips"].get(name, []) if "." in a] for name in (virtio, e1000)}
    assert any(a.startswith("10.0.2.") for a in v4[virtio]), facts["ips"]
    assert any(a.startswith("10.0.3.") for a in v4[e1000]), facts["ips"]
    assert status["agent"] == booted.manifest["agent_version"]
    assert facts["labels"] == LABELS  # from edgerun.labels= on the kernel command line


def test_shell_task_runs_on_the_image_kernel(booted: Booted) -> None:
    final = booted.run("uname", "uname -a")
    assert final["exit_code"] == 0
    assert booted.manifest["kernel"] in final["stdout"] and "x86_64" in final["stdout"]
    states = booted.observer.states("uname")
    assert states == ["accepted", "running", "succeeded"]
    # no download or signed task yet: OpenSSL still waits in its pack, out of RAM
    folder = booted.run("folder", "ls /usr/lib/edgerun-agent/")["stdout"].split()
    assert "edgerun-agent.xpack" in folder
    assert not any(name.startswith(("libssl", "libcrypto")) for name in folder)


def test_tasks_get_a_cgroup_and_leave_nothing_behind(booted: Booted) -> None:
    final = booted.run("contained", "cat /proc/self/cgroup; "
                       "setsid sleep 1234.5 >/dev/null 2>&1 & sleep 0.3")
    assert "/t-contained" in final["stdout"], final["stdout"]  # its own cgroup v2
    # [.] keeps the pattern from matching the command line of the shell running it
    left = booted.run("contained-check", "for p in /proc/[0-9]*; do tr '\\0' ' ' "
                      "<$p/cmdline 2>/dev/null; echo; done | grep -c 'sleep 1234[.]5' || true")
    assert left["stdout"].strip() == "0", "a process of a finished task lives on"


def test_download_from_the_host_with_its_sha256(booted: Booted) -> None:
    task = {"v": 1, "kind": "task", "id": "fetch", "type": "download",
            "url": f"{booted.http}/file", "dest": "/var/tmp/edgerun/payload.bin",
            "sha256": PAYLOAD_SHA, "mode": "0600"}
    booted.observer.send(booted.node, task)
    final = booted.observer.final("fetch", TASK_TIMEOUT)
    assert final["state"] == "succeeded", final
    assert final["sha256"] == PAYLOAD_SHA and final["bytes"] == len(PAYLOAD)
    assert final["dest"] == "/var/tmp/edgerun/payload.bin"
    check = booted.run("check", "sha256sum /var/tmp/edgerun/payload.bin; "
                       "stat -c %a /var/tmp/edgerun/payload.bin")
    digest, _, rest = check["stdout"].partition(" ")
    assert digest == hashlib.sha256(PAYLOAD).hexdigest()
    assert rest.split()[-1] == "600"


def test_agent_memory_inside_the_vm(booted: Booted, capsys: pytest.CaptureFixture[str]) -> None:
    # one process (PyInstaller's one-folder bootloader runs Python itself, with no
    # launcher) and nothing unpacked into /tmp
    final = booted.run("rss", 'for p in $(pidof edgerun-agent); do '
                       "awk '/^(VmRSS|RssAnon|RssFile|RssShmem):/{print $1 $2}' "
                       '/proc/$p/status | tr "\\n" " "; echo; done; '
                       'echo "tmp $(du -sk /tmp | cut -f1)"; '
                       "echo \"mem $(awk '/^MemAvailable:/{print $2}' /proc/meminfo)\"")
    lines = final["stdout"].splitlines()
    agents = [dict(f.split(":") for f in line.split()) for line in lines if "VmRSS" in line]
    assert len(agents) == 1, final["stdout"]
    extra = {line.split()[0]: int(line.split()[1]) for line in lines
             if line.split()[0] in ("tmp", "mem")}
    assert extra["tmp"] < 1024, final["stdout"]  # KiB: no copy of the agent in /tmp
    rss = {k: int(v) for k, v in agents[0].items()}
    assert 0 < rss["RssAnon"] < rss["VmRSS"]
    booted.report.update({"agent_rss_kib": rss["VmRSS"], "agent_anon_kib": rss["RssAnon"],
                          "unpacked_in_tmp_kib": extra["tmp"],
                          "mem_available_kib": extra["mem"]})
    _write_report(booted, capsys)


def test_modules_of_absent_hardware_leave_ram(booted: Booted) -> None:
    """After coldplug the drivers of NICs this machine does not have are removed (files of
    an initramfs are RAM); loaded ones, USB ones and their dependencies stay."""
    moddir = f"/lib/modules/{booted.manifest['kernel']}/kernel/drivers"
    check = {"ice": f"{moddir}/net/ethernet/intel/ice/ice.ko.xz",
             "tg3": f"{moddir}/net/ethernet/broadcom/tg3.ko.xz",
             "e1000": f"{moddir}/net/ethernet/intel/e1000/e1000.ko.xz",
             "virtio_net": f"{moddir}/net/virtio_net.ko.xz",
             "r8152": f"{moddir}/net/usb/r8152.ko.xz"}
    script = (f"while [ -e {check['ice']} ] && [ $((n += 1)) -lt 300 ]; do sleep 0.1; done; "
              + " ".join(f"[ -e {path} ] && echo {name};" for name, path in check.items()))
    kept = set(booted.run("pruned", script)["stdout"].split())
    assert kept == {"e1000", "virtio_net", "r8152"}


def test_agent_is_restarted_when_it_dies(booted: Booted,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    onlines = len(booted.observer.of("status", node=booted.node, state="online"))
    # kill -9 the Python process that runs the agent, from a task of its own
    booted.observer.send(booted.node, shell("suicide", KILL_AGENT))
    will = booted.observer.wait("status", TASK_TIMEOUT, node=booted.node, state="offline")[-1]
    assert "facts" not in will  # the broker's Last Will, not a clean goodbye
    died = time.monotonic()
    assert wait_until(lambda: len(booted.observer.of("status", node=booted.node,
                                                     state="online")) > onlines, TASK_TIMEOUT)
    booted.report["restart_to_online_s"] = round(time.monotonic() - died, 1)
    final = booted.observer.final("suicide", TASK_TIMEOUT)
    assert final["state"] == "failed" and final["error"]["code"] == "internal"
    assert "restarted" in final["error"]["message"]
    assert re.search(r"edgerun-agent exited with status \d+; starting it again", booted.vm.log())
    # and the new agent takes tasks
    assert booted.run("after", "echo alive")["stdout"] == "alive\n"
    _write_report(booted, capsys)


# kill -9 the agent (one process: Python in PyInstaller's bootloader)
KILL_AGENT = """
kill -9 $(pidof edgerun-agent)
sleep 30
"""


def _write_report(booted: Booted, capsys: pytest.CaptureFixture[str]) -> None:
    (OUT / "vm-report.json").write_text(json.dumps(booted.report, indent=2) + "\n")
    with capsys.disabled():
        print(f"\nimage figures: {json.dumps(booted.report)}")
