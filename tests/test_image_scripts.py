"""The image's helpers on their own: the cpio writer, the scripts' lint, the systemd unit."""

from __future__ import annotations

import lzma
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from .test_image_binary import load_images_module, prerequisites

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "images"
ROOTFS = IMAGES / "rootfs"


def shell_scripts() -> list[Path]:
    scripts = sorted(IMAGES.glob("*.sh"))
    for path in sorted(ROOTFS.rglob("*")):
        if path.is_file() and (path.read_bytes().startswith(b"#!/bin/sh")
                               or path.suffix == ".sh"):
            scripts.append(path)
    return scripts


def test_cpio_round_trip_keeps_every_kind_of_entry() -> None:
    mk = load_images_module("mkinitramfs")
    tree = mk.Tree()
    tree.file("usr/bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
    tree.file("etc/odd", b"abc")  # a size that needs padding
    tree.symlink("bin/sh", "/bin/busybox")
    tree.chardev("dev/console", 5, 1)
    tree.mkdir("tmp", 0o1777)
    kinds = [kind for kind in ("lz4", "zstd") if shutil.which(kind)] + ["xz", "gzip", "none"]
    for kind in kinds:
        archive = mk.compress(mk.write_cpio(tree), kind)
        back = mk.read_cpio(mk.decompress(archive))
        assert back == tree.entries
    order = list(mk.read_cpio(mk.write_cpio(tree)))
    for name in order:  # every parent directory comes before what it holds
        parent = name.rpartition("/")[0]
        assert not parent or order.index(parent) < order.index(name)
    assert stat.S_ISCHR(tree.entries["dev/console"].mode)
    assert mk.write_cpio(tree) == mk.write_cpio(tree)  # same inputs, same bytes


def test_module_closure_follows_modules_dep(tmp_path: Path) -> None:
    mk = load_images_module("mkinitramfs")
    moddir = tmp_path / "lib" / "modules" / "6.1.0-test"
    for rel in ("kernel/net/a.ko", "kernel/net/b.ko", "kernel/net/c-d.ko", "kernel/x/z.ko"):
        (moddir / rel).parent.mkdir(parents=True, exist_ok=True)
        (moddir / rel).write_bytes(rel.encode())
    (moddir / "modules.dep").write_text(
        "kernel/net/a.ko: kernel/net/b.ko kernel/net/c-d.ko\nkernel/net/b.ko: kernel/net/c-d.ko\n"
        "kernel/net/c-d.ko:\nkernel/x/z.ko:\n")
    (moddir / "modules.alias").write_text("alias pci:v1* a\nalias pci:v2* z\n")
    (moddir / "modules.builtin").write_text("kernel/net/builtin.ko\n")
    tree = mk.Tree()
    included, missing = mk.add_modules(tree, tmp_path, "6.1.0-test", ["a", "builtin", "nope"],
                                       Path("/nonexistent-busybox"))
    assert included == ["a", "b", "c_d"] and missing == ["nope"]
    base = "lib/modules/6.1.0-test"
    assert f"{base}/kernel/x/z.ko.xz" not in tree.entries
    assert tree.entries[f"{base}/modules.alias"].data == b"alias pci:v1* a\n"
    # xz-compressed (busybox modprobe decompresses them), and modules.dep names them so
    assert tree.entries[f"{base}/modules.dep"].data.decode().splitlines() == [
        "kernel/net/a.ko.xz: kernel/net/b.ko.xz kernel/net/c-d.ko.xz",
        "kernel/net/b.ko.xz: kernel/net/c-d.ko.xz", "kernel/net/c-d.ko.xz:"]
    for rel in ("kernel/net/a.ko", "kernel/net/b.ko", "kernel/net/c-d.ko"):
        assert lzma.decompress(tree.entries[f"{base}/{rel}.xz"].data) == rel.encode()
    plain = mk.Tree()
    mk.add_modules(plain, tmp_path, "6.1.0-test", ["b"], Path("/nonexistent-busybox"),
                   compressed=False)
    assert plain.entries[f"{base}/kernel/net/b.ko"].data == b"kernel/net/b.ko"
    assert plain.entries[f"{base}/modules.dep"].data == (
        b"kernel/net/b.ko: kernel/net/c-d.ko\nkernel/net/c-d.ko:\n")


def test_floor_is_busybox_alone_saying_when_it_runs(tmp_path: Path) -> None:
    mk = load_images_module("mkinitramfs")
    busybox = tmp_path / "busybox"
    (busybox / "bin").mkdir(parents=True)
    # a stand-in that lists its applets as busybox does (the real one: the image test)
    (busybox / "bin" / "busybox").write_text("#!/bin/sh\necho bin/sh; echo bin/sleep\n")
    (busybox / "bin" / "busybox").chmod(0o755)
    out = tmp_path / "floor.img"
    assert mk.main(["--floor", str(out), "--busybox-root", str(busybox)]) == 0
    entries = mk.read_cpio(mk.decompress(out.read_bytes()))
    init = entries["init"].data.decode()
    assert mk.FLOOR_UP in init and mk.FLOOR_MEMINFO in init and "/proc/meminfo" in init
    assert entries["bin/busybox"].data == (busybox / "bin" / "busybox").read_bytes()
    assert entries["bin/sh"].data == entries["bin/sleep"].data == b"/bin/busybox"
    assert not any(name.startswith(("usr/lib/edgerun", "lib/modules")) for name in entries)


def test_the_image_and_the_agent_agree_on_placeholder_uuids() -> None:
    """The service script waits for the NICs when the agent will name itself after a MAC:
    its list of placeholder DMI UUIDs is the agent's."""
    from edgerun.agent.identity import _BOGUS_UUIDS

    text = (ROOTFS / "lib" / "edgerun" / "functions.sh").read_text()
    body = text[text.index("dmi_uuid_usable() {"):]
    body = body[:body.index("\n}\n")]
    found = set(re.findall(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", body))
    assert found | {""} == _BOGUS_UUIDS and '""' in body


def test_shell_scripts_are_strict_and_shellcheck_clean() -> None:
    prerequisites("lint")
    scripts = shell_scripts()
    assert IMAGES / "build-image.sh" in scripts and ROOTFS / "init" in scripts
    for script in scripts:
        text = script.read_text()
        if script.parent == IMAGES:  # bash on the build host
            assert "\nset -euo pipefail\n" in text, script
        elif script.suffix != ".sh":  # busybox ash in the image (a .sh there is sourced)
            strict = "\nset -eu -o pipefail\n" in text
            # /init (PID 1) and the service script must never stop half-way: -u only
            allowed = "\nset -u -o pipefail\n" in text and "No `set -e`" in text
            assert strict or allowed, script
    done = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_python_helpers_pass_mypy_strict() -> None:
    files = [*IMAGES.glob("*.py"), *(IMAGES / "binary").glob("*.py")]
    done = subprocess.run([sys.executable, "-m", "mypy", "--strict", *map(str, files)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not found: apt-get install systemd")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (IMAGES / "edgerun-agent.service").read_text()
    assert "ExecStart=/usr/local/bin/edgerun-agent " in unit
    # verify checks that ExecStart exists: stand a real executable in for the binary
    copy = tmp_path / "edgerun-agent.service"
    stand_in = shutil.which("true") or "/bin/true"
    copy.write_text(unit.replace("/usr/local/bin/edgerun-agent", stand_in))
    done = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_prereqs_name_the_debian_packages_that_are_missing(tmp_path: Path) -> None:
    # a PATH with nothing on it but what the script itself runs
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("id", "sort"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    done = subprocess.run(["/bin/bash", str(IMAGES / "prereqs.sh"), "binary", "vm"],
                          capture_output=True, text=True,
                          env={"PATH": str(bin_dir), "EDGERUN_NO_INSTALL": "1"})
    assert done.returncode == 3, done.stderr
    assert "build.sh: qemu-system-x86_64 not found: apt-get install qemu-system-x86" \
        in done.stderr
    assert "patchelf not found: apt-get install patchelf" in done.stderr
    assert "objcopy not found: apt-get install binutils" in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("build.sh: as root: apt-get install ")
    assert "qemu-system-x86" in last.split() and "binutils" in last.split()


def test_overlay_keeps_exec_bits_and_adds_site_cas(tmp_path: Path) -> None:
    mk = load_images_module("mkinitramfs")
    overlay = tmp_path / "overlay"
    (overlay / "usr/local/share/ca-certificates").mkdir(parents=True)
    (overlay / "usr/local/share/ca-certificates/site.crt").write_bytes(b"SITE CA\n")
    (overlay / "etc/edgerun").mkdir(parents=True)
    (overlay / "etc/edgerun/agent.toml").write_text('log_level = "debug"\n')
    (overlay / "usr/bin").mkdir(parents=True)
    (overlay / "usr/bin/site-tool").write_text("#!/bin/sh\n")
    (overlay / "usr/bin/site-tool").chmod(0o755)
    tree = mk.Tree()
    tree.file(mk.CA_BUNDLE, b"MOZILLA CA")
    tree.copy_tree(overlay)
    assert mk.add_local_cas(tree) == 1
    assert tree.entries[mk.CA_BUNDLE].data == b"MOZILLA CA\nSITE CA\n"
    assert stat.S_IMODE(tree.entries["usr/bin/site-tool"].mode) == 0o755
    assert stat.S_IMODE(tree.entries["etc/edgerun/agent.toml"].mode) == 0o644


def test_pruning_keeps_loaded_and_usb_modules_and_what_they_need(tmp_path: Path) -> None:
    moddir = tmp_path / "modules"
    dep = {
        "kernel/drivers/net/ethernet/intel/e1000/e1000.ko.xz": [],
        "kernel/drivers/net/virtio_net.ko.xz": ["kernel/drivers/net/net_failover.ko.xz",
                                                "kernel/net/core/failover.ko.xz"],
        "kernel/drivers/net/net_failover.ko.xz": ["kernel/net/core/failover.ko.xz"],
        "kernel/net/core/failover.ko.xz": [],
        "kernel/drivers/net/ethernet/intel/ice/ice.ko.xz": ["kernel/lib/dim.ko.xz"],
        "kernel/lib/dim.ko.xz": [],
        "kernel/drivers/net/usb/r8152.ko.xz": ["kernel/drivers/net/mii.ko.xz"],
        "kernel/drivers/net/mii.ko.xz": [],
        "kernel/drivers/usb/host/xhci-pci.ko.xz": ["kernel/drivers/usb/host/xhci-hcd.ko.xz"],
        "kernel/drivers/usb/host/xhci-hcd.ko.xz": [],
        "kernel/drivers/net/ethernet/broadcom/tg3.ko.xz": [],
    }
    for path in dep:
        (moddir / path).parent.mkdir(parents=True, exist_ok=True)
        (moddir / path).write_bytes(b"module")
    (moddir / "modules.dep").write_text(
        "".join(f"{p}: {' '.join(d)}\n".replace(" \n", "\n") for p, d in dep.items()))
    (moddir / "modules.alias").write_text("alias pci:v* e1000\n")
    loaded = tmp_path / "proc-modules"
    loaded.write_text("virtio_net 61440 0 - Live 0x0\nnet_failover 20480 1 virtio_net, "
                      "Live 0x0\nfailover 16384 1 net_failover, Live 0x0\ne1000 155648 0 - "
                      "Live 0x0\n")
    # bash stands in for busybox ash (dash has no pipefail)
    done = subprocess.run(["bash", str(ROOTFS / "sbin" / "edgerun-prune-modules"), str(moddir),
                           str(loaded)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    left = {p for p in dep if (moddir / p).exists()}
    assert left == set(dep) - {"kernel/drivers/net/ethernet/intel/ice/ice.ko.xz",
                               "kernel/lib/dim.ko.xz",
                               "kernel/drivers/net/ethernet/broadcom/tg3.ko.xz"}
    assert (moddir / "modules.dep").exists() and (moddir / "modules.alias").exists()
