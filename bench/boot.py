"""Item 5's boot: the discovery image in QEMU against its floor, in the same run.

The floor is busybox alone in an initramfs on the same kernel, in the same VM (two
NICs, 512 MiB, 2 vCPUs, direct kernel boot, the accelerator images/vm.py picks:
TCG here): its /init says it runs, waits and prints /proc/meminfo
(images/mkinitramfs.py --floor). The two boot alternately, `runs` times each, so
that both see the same load on the machine. For each boot:

- power-on to online: seconds from starting QEMU to the retained online status at
  a subscriber (the image), or to the floor's line on the serial console;
- the QEMU process's CPU seconds (user + system) to that moment: the same work
  costs the same CPU however loaded the machine is, where wall time does not;
- RAM at idle: MemTotal - MemAvailable inside the guest, FLOOR_IDLE_S after
  online (the image: a shell task's `tr </proc/meminfo`, whose two busybox
  processes are counted);
- when each step was first seen on the serial console (kernel, initramfs
  unpacked, /init, the agent's first line, connected), wall and CPU seconds;
- the load average before the boot.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import ROOT, median
from tests.brokers import wait_until

OUT = ROOT / "images" / "out"
TIMEOUT_S = 300.0
STEPS = {  # console line -> step name
    b"Linux version": "kernel", b"Freeing initrd memory": "initramfs unpacked",
    b"Run /init": "/init", b"edgerun: DHCP on eth": "DHCP started",
    # either NIC's (eth0 is not always the first to get one), and the agent's own line
    # (the kernel says "connected to" too)
    b" bound 10.0.": "first lease", b"INFO edgerun.agent.core: edgerun-agent": "agent",
    b"agent-mqtt: connected to": "connected", b"edgerun-floor: up": "floor up",
}


def qemu_cpu_s(pid: int) -> float:
    """User + system CPU seconds of the QEMU process (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Timeline:
    """When each step first shows on the serial console: (wall s, QEMU CPU s)."""

    def __init__(self, vm: Any) -> None:
        self.vm = vm
        self.seen: dict[str, tuple[float, float]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stop.wait(0.01):
            try:
                data = self.vm.console.read_bytes()
            except OSError:
                continue
            for needle, step in STEPS.items():
                if step not in self.seen and needle in data:
                    self.seen[step] = (round(self.vm.seconds_since_start(), 2),
                                       round(qemu_cpu_s(self.vm.proc.pid), 2))

    def close(self) -> dict[str, tuple[float, float]]:
        self.stop.set()
        self.thread.join()
        return dict(self.seen)


def _used_kib(meminfo: str) -> int:
    fields = dict(zip(meminfo.split()[::2], meminfo.split()[1::2], strict=False))
    return int(fields["MemTotal:"]) - int(fields["MemAvailable:"])


def _nics(vm_module: Any) -> list[Any]:
    return [vm_module.Nic("virtio-net-pci", "52:54:00:ed:9f:01"),
            vm_module.Nic("e1000", "52:54:00:ed:9f:02", net="10.0.3.0/24")]


def boot_floor(vm_module: Any, mk: Any, work: Path, run: int) -> dict[str, Any]:
    vm = vm_module.VM(initrd=OUT / "floor.img", nics=_nics(vm_module), memory_mb=512, cpus=2,
                      console=work / f"floor-{run}.log").start()
    timeline = Timeline(vm)
    out: dict[str, Any] = {"load_before": os.getloadavg()[0]}
    try:
        assert vm.proc is not None
        if vm.wait_console(mk.FLOOR_UP.encode(), TIMEOUT_S):
            out["online_s"] = vm.seconds_since_start()
            out["cpu_s"] = qemu_cpu_s(vm.proc.pid)
        if vm.wait_console(mk.FLOOR_MEMINFO.encode(), mk.FLOOR_IDLE_S + 60):
            line = next(x for x in vm.log().splitlines() if mk.FLOOR_MEMINFO in x)
            out["ram_used_kib"] = _used_kib(line.split(mk.FLOOR_MEMINFO, 1)[1])
    finally:
        out["steps"] = timeline.close()
        vm.stop()
    return out


def boot_image(vm_module: Any, idle_s: float, broker: str, port: int, work: Path,
               run: int) -> dict[str, Any]:
    from tests.mqttkit import Observer, shell

    node = f"boot-{uuid.uuid4().hex[:8]}"
    append = f"edgerun.broker=mqtt://10.0.2.2:{port} edgerun.node={node}"
    out: dict[str, Any] = {"load_before": os.getloadavg()[0]}
    with Observer(broker) as observer:
        vm = vm_module.VM(append=append, nics=_nics(vm_module), memory_mb=512, cpus=2,
                          console=work / f"image-{run}.log").start()
        timeline = Timeline(vm)
        try:
            assert vm.proc is not None
            if wait_until(lambda: bool(observer.of("status", node=node, state="online")),
                          TIMEOUT_S, interval=0.01):
                out["online_s"] = vm.seconds_since_start()
                out["cpu_s"] = qemu_cpu_s(vm.proc.pid)
                time.sleep(idle_s)  # the agent idles as the floor does before its reading
                observer.send(node, shell("meminfo", "tr -s ' \\n' ' ' </proc/meminfo"))
                final = observer.final("meminfo", 120)
                out["ram_used_kib"] = _used_kib(final["stdout"])
        finally:
            out["steps"] = timeline.close()
            vm.stop()
    return out


def image_boot(broker: str, work: Path, runs: int) -> dict[str, Any]:
    """Floor and image, alternately, `runs` times each. Needs `./build.sh image`."""
    import shutil

    if not all((OUT / name).exists() for name in ("vmlinuz", "initramfs.img", "floor.img")):
        print("  item 5: image boot: not built (./build.sh image)", flush=True)
        return {"built": False}
    if shutil.which("qemu-system-x86_64") is None:
        print("  item 5: image boot: qemu-system-x86_64 not found", flush=True)
        return {"built": True, "qemu": False}
    from tests.test_image_binary import load_images_module

    vm_module, mk = load_images_module("vm"), load_images_module("mkinitramfs")
    port = int(broker.rsplit(":", 1)[1])
    work.mkdir(parents=True, exist_ok=True)
    floors, images = [], []
    for run in range(runs):
        floors.append(boot_floor(vm_module, mk, work, run))
        images.append(boot_image(vm_module, mk.FLOOR_IDLE_S, broker, port, work, run))
        print(f"  item 5: boot {run + 1}/{runs}: floor {floors[-1].get('online_s', 0):.1f} s, "
              f"image {images[-1].get('online_s', 0):.1f} s (load "
              f"{floors[-1]['load_before']:.1f}, {images[-1]['load_before']:.1f})", flush=True)
    entry: dict[str, Any] = {
        "built": True, "accel": vm_module.choose_accel(OUT / "vmlinuz"), "runs": runs,
        "floor": floors, "image": images,
        "initramfs_bytes": (OUT / "initramfs.img").stat().st_size,
        "floor_initramfs_bytes": (OUT / "floor.img").stat().st_size,
    }
    for key in ("online_s", "cpu_s", "ram_used_kib"):
        f = [b[key] for b in floors if key in b]
        i = [b[key] for b in images if key in b]
        entry[f"floor_{key}"], entry[f"image_{key}"] = median(f), median(i)
        pairs = [b[key] - a[key] for a, b in zip(floors, images, strict=True)
                 if key in a and key in b]
        entry[f"extra_{key}"] = median(pairs)  # the image over the floor of the same round
    entry["failed"] = sum("online_s" not in b for b in floors + images)
    entry["boot_to_online_s"] = entry["image_online_s"]
    print(f"  item 5: image boot ({entry['accel']}): online {entry['image_online_s']:.1f} s "
          f"against the floor's {entry['floor_online_s']:.1f} s (+{entry['extra_online_s']:.1f} "
          f"s, +{entry['extra_cpu_s']:.1f} CPU s); RAM at idle "
          f"+{entry['extra_ram_used_kib'] / 1024:.1f} MiB", flush=True)
    return entry
