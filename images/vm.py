"""Boot the discovery image in QEMU: KVM when it really runs guests, else software emulation.

    python3 images/vm.py --broker mqtt://10.0.2.2:1883 [--node ID] [--nic e1000] ...

With user-mode networking the guest reaches the host's 127.0.0.1 as 10.0.2.2,
so a broker or HTTP server on the host's loopback serves the image with no
bridge, tap device or root. The boot test (tests/test_image_boot.py) drives
the same class.

`--accel auto` uses KVM when /dev/kvm opens, creates a VM and a probe boot of
the kernel prints its first line within `probe_s` (a nested set-up can accept
a VM and then never run it); otherwise TCG, software emulation.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
KVM_GET_API_VERSION, KVM_CREATE_VM = 0xAE00, 0xAE01
FIRST_LINE = b"Linux version"


def kvm_usable(device: str = "/dev/kvm") -> bool:
    """/dev/kvm opens read-write, speaks API 12 and creates a VM."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if fcntl.ioctl(fd, KVM_GET_API_VERSION) != 12:
            return False
        os.close(fcntl.ioctl(fd, KVM_CREATE_VM, 0))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


_chosen: dict[str, str] = {}


def choose_accel(kernel: Path, probe_s: float = 10.0) -> str:
    """kvm if a guest really runs under it, else tcg; probed once per process.

    Some nested set-ups create KVM VMs that never get past the kernel's
    decompressor, so the probe boots `kernel` (no initramfs) and waits for its
    first line on the serial console.
    """
    if "accel" not in _chosen:
        _chosen["accel"] = "kvm" if kvm_usable() and _kernel_speaks(kernel, probe_s) else "tcg"
    return _chosen["accel"]


def _kernel_speaks(kernel: Path, timeout: float) -> bool:
    with tempfile.TemporaryDirectory(prefix="edgerun-kvm-probe-") as tmp:
        probe = VM(kernel=kernel, initrd=None, nics=[], memory_mb=128, cpus=1, accel="kvm",
                   console=Path(tmp) / "console.log").start()
        try:
            return probe.wait_console(FIRST_LINE, timeout)
        finally:
            probe.stop()


@dataclass
class Nic:
    model: str                      # virtio-net-pci, e1000, ...
    mac: str
    net: str | None = None          # user-mode network, default 10.0.2.0/24
    tftp: str | None = None         # directory served by QEMU's TFTP server
    bootfile: str | None = None     # DHCP boot file name (PXE)

    def args(self, index: int, rom: bool) -> list[str]:
        netdev = f"user,id=n{index}"
        for key in ("net", "tftp", "bootfile"):
            value = getattr(self, key)
            if value:
                netdev += f",{key}={value}"
        device = f"{self.model},netdev=n{index},mac={self.mac}"
        if not rom:  # direct kernel boot needs no PXE ROM (nor the ipxe-qemu package)
            device += ",romfile="
        return ["-netdev", netdev, "-device", device]


@dataclass
class VM:
    kernel: Path | None = OUT / "vmlinuz"
    initrd: Path | None = OUT / "initramfs.img"
    append: str = ""
    nics: list[Nic] = field(default_factory=lambda: [Nic("virtio-net-pci", "52:54:00:00:00:01")])
    memory_mb: int = 512
    cpus: int = 2
    smbios: dict[str, str] = field(default_factory=dict)
    pxe: bool = False               # boot from the first NIC's ROM instead of -kernel
    accel: str = "auto"             # auto, kvm or tcg; after start(): the one in use
    probe_s: float = 10.0
    console: Path = Path("console.log")
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    def command(self, accel: str) -> list[str]:
        qemu = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
        cmd = [qemu, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
               "-machine", "q35", "-m", str(self.memory_mb), "-smp", str(self.cpus),
               "-serial", f"file:{self.console}", "-monitor", "none",
               "-device", "virtio-rng-pci"]
        cmd += ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else \
            ["-accel", "tcg", "-cpu", "max"]
        if self.smbios:
            cmd += ["-smbios", "type=1," + ",".join(f"{k}={v}" for k, v in self.smbios.items())]
        for index, nic in enumerate(self.nics):
            cmd += nic.args(index, rom=self.pxe and index == 0)
        if self.pxe:
            cmd += ["-boot", "n"]
        else:
            assert self.kernel is not None
            cmd += ["-kernel", str(self.kernel),
                    "-append", f"console=ttyS0 earlyprintk=ttyS0 panic=-1 {self.append}".strip()]
            if self.initrd is not None:
                cmd += ["-initrd", str(self.initrd)]
        return cmd

    def start(self) -> VM:
        if self.accel == "auto":
            self.accel = choose_accel(self.kernel or OUT / "vmlinuz", self.probe_s)
        self.console.write_bytes(b"")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(self.command(self.accel), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        return self

    def seconds_since_start(self) -> float:
        return time.monotonic() - self.started_at

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except OSError:
            return ""

    def qemu_output(self) -> str:
        """What QEMU itself said (errors); only once it has exited."""
        if self.proc is None or self.proc.poll() is None or self.proc.stdout is None:
            return ""
        return self.proc.stdout.read().decode(errors="replace")

    def wait_console(self, needle: bytes, timeout: float) -> bool:
        """Until `needle` shows on the serial console, QEMU exits, or `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if needle in self.console.read_bytes():
                    return True
            except OSError:
                pass
            if not self.alive():
                return False
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Boot images/out in QEMU with user networking; "
                                     "the host's 127.0.0.1 is 10.0.2.2 in the guest.")
    parser.add_argument("--broker", default="mqtt://10.0.2.2:1883")
    parser.add_argument("--node", default=None)
    parser.add_argument("--append", default="", help="more kernel parameters")
    parser.add_argument("--nic", action="append", default=[], metavar="MODEL",
                        help="NIC model, repeatable (default: virtio-net-pci)")
    parser.add_argument("--memory", type=int, default=512, metavar="MB")
    parser.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    parser.add_argument("--console", type=Path, default=OUT / "console.log")
    args = parser.parse_args(argv)
    append = f"edgerun.broker={args.broker}"
    if args.node:
        append += f" edgerun.node={args.node}"
    nics = [Nic(model, f"52:54:00:00:00:{i + 1:02x}") for i, model in
            enumerate(args.nic or ["virtio-net-pci"])]
    vm = VM(append=f"{append} {args.append}".strip(), nics=nics, memory_mb=args.memory,
            accel=args.accel, console=args.console).start()
    print(f"vm.py: booting under {vm.accel}; console in {args.console} (Ctrl-C stops)",
          file=sys.stderr)
    try:
        assert vm.proc is not None
        vm.proc.wait()
    except KeyboardInterrupt:
        vm.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
