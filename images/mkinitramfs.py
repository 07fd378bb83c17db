"""Assemble the discovery image's initramfs: a compressed newc cpio archive.

Written in Python rather than with cpio(1) so that it needs no root (the
archive carries /dev/console as a device node without mknod), no cpio or kmod
package, and gives the same bytes for the same inputs (fixed owners and times).

    python3 images/mkinitramfs.py --kernel-root K --busybox-root B --ca-root C \
        --agent-root images/out/edgerun-agent.root --out images/out [--overlay DIR]...
    python3 images/mkinitramfs.py --list images/out/initramfs.img
    python3 images/mkinitramfs.py --floor images/out/floor.img --busybox-root B

--floor writes the benchmark's floor instead (bench/footprint.py): busybox and an
/init that says it runs, waits FLOOR_IDLE_S and prints /proc/meminfo, on the same
kernel: power-on to user space and the RAM of a machine that runs nothing.

K, B and C are the unpacked linux-image, busybox-static and ca-certificates
Debian packages; the agent root is the tree images/binary/image_folder.py made
(the agent's folder, its symlink in /usr/bin, glibc). The network modules
(images/modules.txt) come with their dependencies, and modules.dep/modules.alias
are cut down to them, so that busybox modprobe can load a device's driver from
its modalias. Each module is stored xz-compressed (`.ko.xz`, which busybox
modprobe decompresses as it loads it): the unpacked initramfs stays in RAM for
as long as the image runs, and the 60 modules take 4.6 MB instead of 20 MB.
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import os
import stat
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CA_BUNDLE = "etc/ssl/certs/ca-certificates.crt"
AGENT_PATH = "usr/bin/edgerun-agent"  # a symlink into usr/lib/edgerun-agent/
MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member. `data` is the file's bytes or the symlink's target."""

    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    @property
    def kind(self) -> str:
        if stat.S_ISDIR(self.mode):
            return "dir"
        if stat.S_ISLNK(self.mode):
            return "symlink"
        if stat.S_ISCHR(self.mode):
            return "char"
        return "file"


class Tree:
    """Paths (relative, no leading /) to entries; parent directories are implied."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def _parents(self, path: str) -> None:
        parent = os.path.dirname(path)
        if parent and parent not in self.entries:
            self.mkdir(parent)

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = Entry(stat.S_IFDIR | mode)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = Entry(stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = Entry(stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = Entry(stat.S_IFCHR | mode, rdev=(major, minor))

    def copy_tree(self, source: Path) -> None:
        """Copy a directory into the root: files keep only their executable bit."""
        for path in sorted(source.rglob("*")):
            rel = path.relative_to(source).as_posix()
            if path.is_symlink():
                self.symlink(rel, os.readlink(path))
            elif path.is_dir():
                self.mkdir(rel, 0o755)
            elif path.is_file():
                executable = os.access(path, os.X_OK)
                self.file(rel, path.read_bytes(), 0o755 if executable else 0o644)


# --- the newc format ------------------------------------------------------------------
def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, mode: int, nlink: int, mtime: int, size: int, rdev: tuple[int, int],
            namesize: int) -> bytes:
    fields = (ino, mode, 0, 0, nlink, mtime, size, 0, 0, rdev[0], rdev[1], namesize, 0)
    return MAGIC + b"".join(b"%08X" % f for f in fields)


def write_cpio(tree: Tree, mtime: int = 0) -> bytes:
    """The archive, parents before children, in a stable order."""
    out = bytearray()
    for ino, path in enumerate(sorted(tree.entries), start=1):
        entry = tree.entries[path]
        name = path.encode() + b"\0"
        out += _header(ino, entry.mode, 2 if entry.kind == "dir" else 1, mtime,
                       len(entry.data), entry.rdev, len(name))
        out += name + _pad(110 + len(name))
        out += entry.data + _pad(len(entry.data))
    name = TRAILER.encode() + b"\0"
    out += _header(0, 0, 1, 0, 0, (0, 0), len(name)) + name + _pad(110 + len(name))
    return bytes(out)


def read_cpio(data: bytes) -> dict[str, Entry]:
    """Parse a newc archive (for --list and the tests)."""
    entries: dict[str, Entry] = {}
    pos = 0
    while True:
        if data[pos:pos + 6] != MAGIC:
            raise ValueError(f"no newc header at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        pos += 110
        name = data[pos:pos + namesize - 1].decode()
        pos += namesize + (-(110 + namesize) % 4)
        if name == TRAILER:
            return entries
        body = data[pos:pos + size]
        pos += size + (-size % 4)
        entries[name] = Entry(mode, body, (fields[9], fields[10]))


# lz4 by default (its legacy frame, the one the kernel reads): the kernel unpacked
# the xz initramfs (43 MB) in 3.6 s under TCG, a third of the boot; zstd decodes
# about 14 times faster for 8 % more bytes (12.9 MB instead of 11.9 MB at level 19),
# and lz4 faster again for 15 % more than zstd (14.7 MB): with QEMU counting
# instructions (-icount) the image reached /init 0.59 units after its busybox floor
# with zstd and 0.18 after it with lz4. The initramfs is read once, at boot; what it
# unpacks to, the RAM it takes, is the same whichever way it is compressed.
ZSTD_LEVEL = 19
LZ4_LEVEL = 12
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"


def compress(data: bytes, kind: str) -> bytes:
    if kind == "lz4":  # -l: the legacy frame, the only one the kernel's decoder knows
        return subprocess.run(["lz4", "-l", f"-{LZ4_LEVEL}", "-q", "-c"], input=data,
                              check=True, capture_output=True).stdout
    if kind == "zstd":
        return subprocess.run(["zstd", f"-{ZSTD_LEVEL}", "-q", "-c", "-T0"], input=data,
                              check=True, capture_output=True).stdout
    if kind == "xz":  # the kernel's decoder wants CRC32; BCJ helps on x86 code
        filters: list[dict[str, int]] = [{"id": lzma.FILTER_X86},
                                         {"id": lzma.FILTER_LZMA2, "preset": 6}]
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                             filters=filters)
    if kind == "gzip":
        return gzip.compress(data, compresslevel=9, mtime=0)
    return data


def decompress(data: bytes) -> bytes:
    if data.startswith(LZ4_LEGACY_MAGIC):
        return subprocess.run(["lz4", "-d", "-q", "-c"], input=data, check=True,
                              capture_output=True).stdout
    if data.startswith(b"\x28\xb5\x2f\xfd"):
        return subprocess.run(["zstd", "-d", "-q", "-c"], input=data, check=True,
                              capture_output=True).stdout
    if data.startswith(b"\xfd7zXZ"):
        return lzma.decompress(data)
    if data.startswith(b"\x1f\x8b"):
        return gzip.decompress(data)
    return data


# --- kernel modules ---------------------------------------------------------------------
def module_name(path: str) -> str:
    base = os.path.basename(path)
    return base.split(".ko")[0].replace("-", "_")


def read_modules_dep(moddir: Path) -> dict[str, tuple[str, list[str]]]:
    """Module name -> (its path, the paths of all it depends on) from modules.dep."""
    deps = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        if path:
            deps[module_name(path)] = (path, rest.split())
    return deps


def wanted_modules(listing: Path) -> list[str]:
    names = []
    for line in listing.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line.replace("-", "_"))
    return names


def compress_module(data: bytes) -> bytes:
    """xz as the kernel's scripts make it for modules (CRC32, a 1 MiB dictionary, so the
    decoder allocates no more), which busybox modprobe decompresses."""
    filters: list[dict[str, int]] = [{"id": lzma.FILTER_LZMA2,
                                      "preset": 9 | lzma.PRESET_EXTREME, "dict_size": 1 << 20}]
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=filters)


def add_modules(tree: Tree, kernel_root: Path, version: str, names: Iterable[str],
                busybox: Path, compressed: bool = True) -> tuple[list[str], list[str]]:
    """Copy the modules (xz-compressed unless `compressed` is false) and what they need;
    returns (included, not in this kernel)."""
    moddir = kernel_root / "lib" / "modules" / version
    if not (moddir / "modules.dep").exists():  # a .deb has none: its postinst runs depmod
        subprocess.run([str(busybox), "depmod", "-b", str(kernel_root), version], check=True)
    deps = read_modules_dep(moddir)
    builtin = {module_name(p) for p in (moddir / "modules.builtin").read_text().split()} \
        if (moddir / "modules.builtin").exists() else set()
    paths: set[str] = set()
    missing = []
    for name in names:
        if name in deps:
            path, needs = deps[name]
            paths.update([path, *needs])
        elif name not in builtin:
            missing.append(name)
    target = f"lib/modules/{version}"
    suffix = ".xz" if compressed else ""
    for path in sorted(paths):
        data = (moddir / path).read_bytes()
        tree.file(f"{target}/{path}{suffix}", compress_module(data) if compressed else data)
    included = {module_name(p) for p in paths}
    dep_lines = [" ".join(f"{word}{suffix}" if word.endswith(".ko") else
                          f"{word[:-1]}{suffix}:" if word.endswith(".ko:") else word
                          for word in line.split())
                 for line in (moddir / "modules.dep").read_text().splitlines()
                 if line.partition(":")[0] in paths]
    tree.file(f"{target}/modules.dep", ("\n".join(dep_lines) + "\n").encode())
    for index in ("modules.alias", "modules.symbols"):
        if (moddir / index).exists():
            lines = [line for line in (moddir / index).read_text().splitlines()
                     if line.startswith("alias ") and line.split()[-1] in included]
            tree.file(f"{target}/{index}", ("\n".join(lines) + "\n").encode())
    if builtin:
        tree.file(f"{target}/modules.builtin", (moddir / "modules.builtin").read_bytes())
    return sorted(included), missing


# --- the floor ---------------------------------------------------------------------------
FLOOR_IDLE_S = 10
FLOOR_UP = "edgerun-floor: up"
FLOOR_MEMINFO = "edgerun-floor: meminfo"
FLOOR_INIT = f"""#!/bin/sh
# The benchmark's floor: user space reached, then the RAM of a machine doing nothing.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "{FLOOR_UP}"
sleep {FLOOR_IDLE_S}
echo "{FLOOR_MEMINFO} $(tr -s ' \\n' ' ' </proc/meminfo)"
exec sleep 2147483647
"""


def floor_tree(busybox_root: Path) -> Tree:
    tree = Tree()
    for path in ("dev", "proc", "sys", "tmp", "run"):
        tree.mkdir(path)
    tree.chardev("dev/console", 5, 1, 0o600)
    add_busybox(tree, busybox_root)
    tree.file("init", FLOOR_INIT.encode(), 0o755)
    return tree


# --- the agent ---------------------------------------------------------------------------
def add_agent(tree: Tree, agent_root: Path) -> None:
    tree.copy_tree(agent_root)
    if tree.entries.get(AGENT_PATH, Entry(0)).kind not in ("file", "symlink"):
        raise SystemExit(f"mkinitramfs: {agent_root} holds no /{AGENT_PATH}")


# --- the image -------------------------------------------------------------------------
def kernel_version(kernel_root: Path) -> str:
    versions = sorted(p.name for p in (kernel_root / "lib" / "modules").iterdir())
    if len(versions) != 1:
        raise SystemExit(f"mkinitramfs: expected one kernel under {kernel_root}, found {versions}")
    return versions[0]


def add_busybox(tree: Tree, busybox_root: Path) -> Path:
    binary = busybox_root / "bin" / "busybox"
    tree.file("bin/busybox", binary.read_bytes(), 0o755)
    listing = subprocess.run([str(binary), "--list-full"], check=True, capture_output=True,
                             text=True).stdout
    for applet in listing.split():
        if applet != "bin/busybox" and applet != "linuxrc":
            tree.symlink(applet, "/bin/busybox")
    return binary


def add_ca_bundle(tree: Tree, ca_root: Path) -> int:
    """The Mozilla set of the ca-certificates package, as update-ca-certificates joins it."""
    certs = sorted((ca_root / "usr" / "share" / "ca-certificates").rglob("*.crt"))
    if not certs:
        raise SystemExit(f"mkinitramfs: no certificates under {ca_root}")
    bundle = b"".join(c.read_bytes().rstrip(b"\n") + b"\n" for c in certs)
    tree.file(CA_BUNDLE, bundle)
    # where OpenSSL (Debian's build, OPENSSLDIR=/usr/lib/ssl) looks by default
    tree.symlink("usr/lib/ssl/cert.pem", "/" + CA_BUNDLE)
    tree.symlink("usr/lib/ssl/certs", "/etc/ssl/certs")
    tree.symlink("etc/ssl/cert.pem", "certs/ca-certificates.crt")
    return len(certs)


def add_local_cas(tree: Tree) -> int:
    """Append the CAs an overlay put in usr/local/share/ca-certificates (Debian's place
    for a site's own) to the bundle, as update-ca-certificates would."""
    local = sorted(name for name, entry in tree.entries.items()
                   if name.startswith("usr/local/share/ca-certificates/")
                   and name.endswith(".crt") and entry.kind == "file")
    if local:
        bundle = tree.entries[CA_BUNDLE].data.rstrip(b"\n") + b"\n"
        extra = b"".join(tree.entries[name].data.rstrip(b"\n") + b"\n" for name in local)
        tree.file(CA_BUNDLE, bundle + extra)
    return len(local)


def build_tree(args: argparse.Namespace) -> tuple[Tree, dict[str, object], list[str]]:
    tree = Tree()
    for path, mode in (("dev", 0o755), ("proc", 0o555), ("sys", 0o555), ("run", 0o755),
                       ("tmp", 0o1777), ("root", 0o700), ("var/lib/edgerun-agent", 0o700),
                       ("var/log", 0o755), ("etc/edgerun", 0o755)):
        tree.mkdir(path, mode)
    # the kernel opens /dev/console before it runs /init, before devtmpfs is mounted
    tree.chardev("dev/console", 5, 1, 0o600)
    tree.chardev("dev/null", 1, 3, 0o666)
    busybox = add_busybox(tree, args.busybox_root)
    version = kernel_version(args.kernel_root)
    included, missing = add_modules(tree, args.kernel_root, version,
                                    wanted_modules(args.modules), busybox)
    certs = add_ca_bundle(tree, args.ca_root)
    add_agent(tree, args.agent_root)
    tree.copy_tree(args.rootfs)
    tree.file("etc/os-release", (
        'NAME="edgerun discovery image"\nID=edgerun\n'
        f'VERSION_ID="{args.agent_version}"\nPRETTY_NAME="edgerun discovery image '
        f'{args.agent_version} (Linux {version})"\n').encode())
    for overlay in args.overlay:
        tree.copy_tree(overlay)
    certs += add_local_cas(tree)
    manifest: dict[str, object] = {
        "kernel": version, "modules": included, "modules_missing": missing,
        "ca_certificates": certs, "agent_version": args.agent_version,
    }
    return tree, manifest, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", type=Path, metavar="INITRAMFS",
                        help="list an initramfs made by this script and exit")
    parser.add_argument("--floor", type=Path, metavar="INITRAMFS",
                        help="write the benchmark's floor (busybox only) and exit")
    parser.add_argument("--kernel-root", type=Path)
    parser.add_argument("--busybox-root", type=Path)
    parser.add_argument("--ca-root", type=Path)
    parser.add_argument("--agent-root", type=Path,
                        help="the agent's tree (images/out/edgerun-agent.root)")
    parser.add_argument("--agent-version", default="unknown")
    parser.add_argument("--rootfs", type=Path, default=HERE / "rootfs")
    parser.add_argument("--modules", type=Path, default=HERE / "modules.txt")
    parser.add_argument("--overlay", type=Path, action="append", default=[],
                        help="a directory copied over the root last (repeatable)")
    parser.add_argument("--compression", choices=("lz4", "zstd", "xz", "gzip", "none"),
                        default="lz4")
    parser.add_argument("--note", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra fact for manifest.json (repeatable)")
    parser.add_argument("--out", type=Path, help="directory for vmlinuz, initramfs.img, "
                        "manifest.json")
    args = parser.parse_args(argv)
    if args.list:
        for name, entry in sorted(read_cpio(decompress(args.list.read_bytes())).items()):
            extra = f" -> {entry.data.decode()}" if entry.kind == "symlink" else \
                f" {len(entry.data)}" if entry.kind == "file" else ""
            print(f"{entry.kind:7} {stat.S_IMODE(entry.mode):04o} /{name}{extra}")
        return 0
    if args.floor:
        if args.busybox_root is None:
            parser.error("--floor needs --busybox-root")
        _replace(args.floor, compress(write_cpio(floor_tree(args.busybox_root)),
                                      args.compression))
        return 0
    needed = ("kernel_root", "busybox_root", "ca_root", "agent_root", "out")
    absent = [f"--{n.replace('_', '-')}" for n in needed if getattr(args, n) is None]
    if absent:
        parser.error(f"missing {', '.join(absent)}")
    tree, manifest, missing = build_tree(args)
    if missing:
        print(f"mkinitramfs: not in kernel {manifest['kernel']}, skipped: {' '.join(missing)}",
              file=sys.stderr)
    for note in args.note:
        key, _, value = note.partition("=")
        manifest[key] = value
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    image = compress(write_cpio(tree, mtime), args.compression)
    args.out.mkdir(parents=True, exist_ok=True)
    _replace(args.out / "initramfs.img", image)
    version = str(manifest["kernel"])
    _replace(args.out / "vmlinuz", (args.kernel_root / "boot" / f"vmlinuz-{version}").read_bytes())
    manifest["initramfs_bytes"] = len(image)
    manifest["vmlinuz_bytes"] = (args.out / "vmlinuz").stat().st_size
    manifest["files"] = sum(1 for e in tree.entries.values() if e.kind == "file")
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return 0


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
