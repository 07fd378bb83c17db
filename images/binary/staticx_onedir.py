"""Make PyInstaller's one-folder agent one static file with staticx.

    staticx_onedir.py FOLDER OUTPUT --unpacker LIB

FOLDER is `pyinstaller --onedir --contents-directory .` output: the bootloader
`edgerun-agent` with libpython, the other shared libraries, lib-dynload and the
data files beside it. staticx packs the bootloader with the C libraries it
needs; this adds the whole folder to the same archive (and the C libraries the
folder's own ELF files need), so staticx's launcher unpacks everything once
and the bootloader runs Python in its own process. A one-file PyInstaller
program inside staticx would unpack a second time at every start, from a
second process that stays for the agent's lifetime (2 MiB of RSS).

staticx compresses its archive with xz, which decompresses at 60-70 MB/s: 0.3 s
of the agent's start for the 20 MB folder. So the folder goes in as two packs
instead, which xz stores without working on them (the discovery image runs the
folder itself: images/binary/image_folder.py):

- `edgerun-agent.zpack`, zlib, everything needed at start (libpython,
  base_library.zip, ...): inflated about five times faster than xz by LIB
  (images/binary/unpack.c), which the bootloader loads as a DT_NEEDED library
  and whose constructor runs before the bootloader opens libpython;
- `edgerun-agent.xpack`, xz, what only TLS and hashing need (OpenSSL, `_ssl`,
  `_hashlib`, certifi's CA bundle): unpacked by the runtime hook
  images/binary/rth_tls.py when `_ssl` or `_hashlib` is first imported, which a
  plain mqtt:// agent does only at its first download or signed task.

The unpacked bootloader finds its folder beside itself, and the libraries
there through the run-time search path staticx gives it.
"""

from __future__ import annotations

import fnmatch
import logging
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from typing import Any

PROGRAM = "edgerun-agent"
ZPACK = "edgerun-agent.zpack"  # the names unpack.c and rth_tls.py look for
XPACK = "edgerun-agent.xpack"
# Loaded only by `import _ssl` / `import _hashlib` (rth_tls.py unpacks them then).
DEFERRED = ("libssl.so*", "libcrypto.so*", "python3.*/lib-dynload/_ssl.*",
            "python3.*/lib-dynload/_hashlib.*", "certifi/cacert.pem")


def _staticx() -> Any:
    """staticx's API and ELF helpers (imported here: the tests load this module for
    write_packs from a venv without staticx)."""
    import staticx.api  # type: ignore[import-untyped,import-not-found,unused-ignore]
    import staticx.elf  # type: ignore[import-untyped,import-not-found,unused-ignore]

    return staticx


def deferred(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in DEFERRED)


WHITEN_SEED = 0x9E3779B97F4A7C15  # unpack.c's


def whiten(data: bytes) -> bytes:
    """XOR with unpack.c's xorshift64* key stream (its own inverse): zlib's output is
    still 1-2 % compressible, so staticx's xz would code it symbol by symbol (0.04 s
    at every start for 3 MB) instead of storing it."""
    mask, x, words = (1 << 64) - 1, WHITEN_SEED, []
    for _ in range((len(data) + 7) // 8):
        x ^= x >> 12
        x ^= (x << 25) & mask
        x ^= x >> 27
        words.append(((x * 0x2545F4914F6CDD1D) & mask).to_bytes(8, "little"))
    key = b"".join(words)[:len(data)]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(
        len(data), "little")


def member(name: str, mode: int, size: int, body: bytes) -> bytes:
    raw = name.encode()
    return struct.pack("<IIQQ", len(raw), mode, size, len(body)) + raw + body


def write_packs(folder: str, names: list[str], zpack: str, xpack: str,
                extra: dict[str, str] | None = None) -> None:
    """The two packs (format: images/binary/unpack.c) of the folder's files `names`,
    and of `extra` (name in the folder: path of a file elsewhere)."""
    start, later = [b"ERZPACK1"], [b"ERXPACK1"]
    files = {name: os.path.join(folder, name) for name in names} | (extra or {})
    for name, path in files.items():
        with open(path, "rb") as fh:
            data = fh.read()
        mode = os.stat(path).st_mode & 0o7777
        if deferred(name):
            later.append(member(name, mode, len(data), data))
        else:
            start.append(member(name, mode, len(data), zlib.compress(data, 9)))
    end = struct.pack("<IIQQ", 0, 0, 0, 0)
    with open(zpack, "wb") as fh:
        fh.write(start[0] + whiten(b"".join([*start[1:], end])))
    filters = [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 9}]
    with open(xpack, "wb") as fh:
        fh.write(lzma.compress(b"".join([*later, end]), format=lzma.FORMAT_XZ,
                               check=lzma.CHECK_CRC32, filters=filters))


def check_deferred_unused_at_start(folder: str, names: list[str]) -> None:
    """No library needed at start may need a deferred one (it would not load)."""
    elf = _staticx().elf
    for name in names:
        path = os.path.join(folder, name)
        if deferred(name) or not elf.is_dynamic_elf(path):
            continue
        for dep in elf.get_shobj_deps(path):
            if deferred(os.path.basename(dep)):
                raise SystemExit(f"staticx_onedir.py: {name} needs {dep}, which is deferred")


def files_of(folder: str) -> list[str]:
    names = []
    for here, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(here, name)
            if path != os.path.join(folder, PROGRAM):
                names.append(os.path.relpath(path, folder))
    return sorted(names)


def build(folder: str, output: str, unpacker: str) -> None:
    staticx = _staticx()
    get_shobj_deps, is_dynamic_elf = staticx.elf.get_shobj_deps, staticx.elf.is_dynamic_elf
    bundled = set(os.listdir(folder))
    names = files_of(folder)
    with tempfile.TemporaryDirectory(prefix="edgerun-staticx-") as work:
        check_deferred_unused_at_start(folder, names)
        # the bootloader loads the unpacker first (staticx finds it through ldd)
        lib = os.path.join(work, os.path.basename(unpacker))
        shutil.copy(unpacker, lib)
        program = os.path.join(work, PROGRAM)
        shutil.copy2(os.path.join(folder, PROGRAM), program)
        # strip before patchelf: strip after it breaks the moved .dynsym (segfault)
        subprocess.run(["strip", program], check=True)
        subprocess.run(["patchelf", "--add-needed", os.path.basename(unpacker), program],
                       check=True)
        os.environ["LD_LIBRARY_PATH"] = work
        # staticx adds the bootloader's own libraries (libz.so.1, say) itself
        own = {os.path.basename(dep) for dep in get_shobj_deps(program)}
        with staticx.api.StaticxGenerator(prog=program, strip=False, compress=True) as gen:
            # C libraries the folder needs besides the bootloader's own (libm for
            # libpython): the bootloader loads none of them before main(), so they can
            # wait in the zlib pack too; the rest staticx adds (xz)
            later_libs: dict[str, str] = {}
            for name in names:
                path = os.path.join(folder, name)
                if not is_dynamic_elf(path):
                    continue
                for dep in get_shobj_deps(path):
                    base = os.path.basename(dep)
                    if base in bundled:
                        continue
                    if base not in own and not base.startswith(("ld-", "libc.")):
                        later_libs[base] = os.path.realpath(dep)
                    else:
                        gen.add_library(dep, exist_ok=True)
            packed = [n for n in names if n not in own]  # staticx adds those
            write_packs(folder, packed, os.path.join(work, ZPACK), os.path.join(work, XPACK),
                        later_libs)
            gen.sxar.add_file(os.path.join(work, ZPACK), arcname=ZPACK)
            gen.sxar.add_file(os.path.join(work, XPACK), arcname=XPACK)
            gen.generate(output=output)


def main(argv: list[str]) -> int:
    args = list(argv)
    unpacker = None
    if "--unpacker" in args[:-1]:
        at = args.index("--unpacker")
        unpacker = args[at + 1]
        del args[at:at + 2]
    if len(args) != 2 or unpacker is None or \
            not os.path.isfile(os.path.join(args[0], PROGRAM)):
        print(f"usage: staticx_onedir.py FOLDER OUTPUT --unpacker LIB (FOLDER holding "
              f"{PROGRAM})", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="staticx: %(message)s")
    build(args[0], args[1], unpacker)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
