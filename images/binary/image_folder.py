"""The discovery image's agent: PyInstaller's one folder, unwrapped, with its C libraries.

    image_folder.py FOLDER ROOT

FOLDER is `pyinstaller --onedir --contents-directory .` output. ROOT receives a
tree to copy over the image's root (images/mkinitramfs.py):

- usr/lib/edgerun-agent/: the folder as it is, run in place, and in its `lib/`
  the C libraries its programs need beyond it (glibc's loader, libc, libm, ...),
  copied from this build host, whose glibc the folder was built against.
  Nothing is unpacked at start (the static binary's staticx copies 20 MB into
  /tmp first: 0.4-0.8 s of system time under TCG and 20 MiB more RAM for as
  long as the agent runs), and there is no launcher process. What only TLS and
  hashing need (OpenSSL, `_ssl`, `_hashlib`, certifi's CA bundle: 5.3 MB) waits
  in `edgerun-agent.xpack` (xz, 1.8 MB), which images/binary/rth_tls.py unpacks
  in place when `_ssl` or `_hashlib` is first imported: a plain mqtt:// agent
  keeps it out of RAM until its first download or signed task (files of an
  initramfs stay in RAM for as long as the image runs). For the same reason
  `base_library.zip`, which PyInstaller stores uncompressed (1.3 MB), is
  deflated (0.5 MB): zipimport inflates the few dozen modules Python's start
  reads from it.
- usr/bin/edgerun-agent: a symlink to the bootloader there.
- symlinks at Debian's paths (/lib64/ld-linux-x86-64.so.2,
  /lib/x86_64-linux-gnu/) to those libraries, where the loader looks without
  any cache or LD_LIBRARY_PATH; the bootloader's own libraries that the folder
  holds (libz.so.1) are linked to the folder's copy.

The libraries are found with ldd, as staticx finds them.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from staticx_onedir import PROGRAM, XPACK, deferred, files_of, member  # noqa: E402

AGENT_DIR = "usr/lib/edgerun-agent"
LINK = "usr/bin/edgerun-agent"
LIBDIR = "lib/x86_64-linux-gnu"


def is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"\x7fELF"
    except OSError:
        return False


def needed_libraries(folder: Path) -> set[Path]:
    """Paths of the shared libraries (and the loader) that the folder's ELF files need
    from outside it. The bootloader's are looked up as the loader finds them when it is
    exec'd (no LD_LIBRARY_PATH: libz.so.1, say, is the system's then); the rest with
    the folder first, as they are loaded once the bootloader runs."""
    found: set[Path] = set()
    for name in [*files_of(str(folder)), PROGRAM]:
        path = folder / name
        if not is_elf(path):
            continue
        env = dict(os.environ)
        if name == PROGRAM:
            env.pop("LD_LIBRARY_PATH", None)
        else:
            env["LD_LIBRARY_PATH"] = str(folder)
        done = subprocess.run(["ldd", str(path)], capture_output=True, text=True, env=env,
                              check=False)
        for line in done.stdout.splitlines():
            words = line.split()
            lib = words[2] if len(words) >= 3 and words[1] == "=>" else \
                words[0] if words and words[0].startswith("/") else None
            if lib is None or not lib.startswith("/"):
                continue  # linux-vdso.so.1, or "not found" (the deferred libraries' own)
            real = Path(os.path.realpath(lib))
            if not real.is_relative_to(folder.resolve()):
                found.add(Path(lib))
    return found


def write_xpack(folder: Path, names: list[str], pack: Path) -> None:
    """The pack images/binary/rth_tls.py unpacks (images/binary/unpack.c's format)."""
    import lzma

    body = [b"ERXPACK1"]
    for name in names:
        data = (folder / name).read_bytes()
        body.append(member(name, (folder / name).stat().st_mode & 0o7777, len(data), data))
    body.append(struct.pack("<IIQQ", 0, 0, 0, 0))  # the end
    filters = [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 9}]
    pack.write_bytes(lzma.compress(b"".join(body), format=lzma.FORMAT_XZ,
                                   check=lzma.CHECK_CRC32, filters=filters))


def deflate_zip(path: Path) -> None:
    """Rewrite the zip archive at `path` with every member deflated, in the same order
    and with the same names, times and modes."""
    import zipfile

    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(path) as src, \
            zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            copy = zipfile.ZipInfo(info.filename, info.date_time)
            copy.external_attr, copy.compress_type = info.external_attr, zipfile.ZIP_DEFLATED
            dst.writestr(copy, src.read(info))
    os.replace(tmp, path)


def build(folder: Path, root: Path) -> None:
    if root.exists():
        shutil.rmtree(root)
    agent = root / AGENT_DIR
    shutil.copytree(folder, agent, symlinks=True)
    later = [name for name in files_of(str(agent)) if deferred(name)]
    write_xpack(agent, later, agent / XPACK)
    for name in later:
        (agent / name).unlink()
    if (agent / "base_library.zip").is_file():
        deflate_zip(agent / "base_library.zip")
    (root / LINK).parent.mkdir(parents=True, exist_ok=True)
    (root / LINK).symlink_to(f"/{AGENT_DIR}/{PROGRAM}")
    (root / LIBDIR).mkdir(parents=True)
    (root / "lib64").mkdir()
    for lib in sorted(needed_libraries(folder)):
        if (agent / lib.name).is_file():  # the folder's copy of the same library
            (root / LIBDIR / lib.name).symlink_to(f"/{AGENT_DIR}/{lib.name}")
            continue
        (agent / "lib").mkdir(exist_ok=True)
        shutil.copy2(os.path.realpath(lib), agent / "lib" / lib.name)
        (root / LIBDIR / lib.name).symlink_to(f"/{AGENT_DIR}/lib/{lib.name}")
        if lib.name.startswith("ld-linux"):  # the loader's name in the programs (PT_INTERP)
            (root / "lib64" / lib.name).symlink_to(f"/{AGENT_DIR}/lib/{lib.name}")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not (Path(argv[0]) / PROGRAM).is_file():
        print(f"usage: image_folder.py FOLDER ROOT (FOLDER holding {PROGRAM})", file=sys.stderr)
        return 2
    build(Path(argv[0]), Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
