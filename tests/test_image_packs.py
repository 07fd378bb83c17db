"""The frozen agent's two packs on their own (images/binary/staticx_onedir.py).

The start-up pack is inflated by images/binary/unpack.c, a library the
bootloader loads first; here it is loaded into a copy of `true` with
LD_PRELOAD, which finds the pack beside its own executable just as the
bootloader does in staticx's directory. The OpenSSL pack is unpacked by the
runtime hook images/binary/rth_tls.py at the first import of `_ssl` or
`_hashlib`. A damaged pack must stop with one clear line and write nothing
outside the folder; it must never start the agent from a half-written folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from types import ModuleType

import pytest

from .test_image_binary import prerequisites

ROOT = Path(__file__).resolve().parent.parent
BINARY = ROOT / "images" / "binary"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"edgerun_binary_{name}", BINARY / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


packs = load("staticx_onedir")


@pytest.fixture(scope="module")
def unpacker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prerequisites("binary")  # gcc and zlib1g-dev: installed as root (CI), else a skip naming them
    lib = tmp_path_factory.mktemp("unpacker") / "libedgerun-unpack.so"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared", "-o",
                    str(lib), str(BINARY / "unpack.c"), "-lz"], check=True)
    return lib


def folder_with(tmp_path: Path, files: dict[str, bytes]) -> Path:
    """A PyInstaller-like folder holding `files`, and its two packs written beside."""
    source = tmp_path / "source"
    for name, data in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    (source / "tool").chmod(0o750)
    target = tmp_path / "run"
    target.mkdir()
    packs.write_packs(str(source), sorted(files), str(target / packs.ZPACK),
                      str(target / packs.XPACK))
    shutil.copy2(shutil.which("true") or "/bin/true", target / "edgerun-agent")
    return target


def run(folder: Path, lib: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(folder / "edgerun-agent")], env={"LD_PRELOAD": str(lib)},
                          capture_output=True, text=True, timeout=60)


FILES = {"libpython3.11.so.1.0": os.urandom(300_000) + b"\0" * 1_000_000,
         "python3.11/lib-dynload/_json.so": b"json" * 1000, "empty": b"", "tool": b"#!x\n",
         "libcrypto.so.3": b"crypto" * 5000, "python3.11/lib-dynload/_ssl.so": b"ssl",
         "certifi/cacert.pem": b"-----BEGIN CERTIFICATE-----\n"}


def test_start_pack_is_inflated_before_main_and_removed(tmp_path: Path, unpacker: Path) -> None:
    folder = folder_with(tmp_path, FILES)
    done = run(folder, unpacker)
    assert done.returncode == 0, done.stderr
    for name, data in FILES.items():
        assert (folder / name).exists() == (not packs.deferred(name)), name
        if not packs.deferred(name):
            assert (folder / name).read_bytes() == data, name
    assert (folder / "tool").stat().st_mode & 0o777 == 0o750
    assert not (folder / packs.ZPACK).exists()
    assert run(folder, unpacker).returncode == 0  # no pack: nothing to do
    # xz stores the whitened pack as it is (what makes it cheap inside staticx's xz)
    import lzma
    packs.write_packs(str(tmp_path / "source"), ["libpython3.11.so.1.0"],
                      str(tmp_path / "z"), str(tmp_path / "x"))
    raw = (tmp_path / "z").read_bytes()
    assert len(lzma.compress(raw)) >= len(raw)


def member(name: bytes, body: bytes, size: int | None = None, mode: int = 0o644) -> bytes:
    data = zlib.compress(body)
    return struct.pack("<IIQQ", len(name), mode, len(body) if size is None else size,
                       len(data)) + name + data


def hostile(folder: Path, *members: bytes, end: bool = True) -> None:
    body = b"".join(members) + (struct.pack("<IIQQ", 0, 0, 0, 0) if end else b"")
    (folder / packs.ZPACK).write_bytes(b"ERZPACK1" + packs.whiten(body))


@pytest.mark.parametrize("case", ["escape", "absolute", "truncated", "no-end", "wrong-size",
                                  "not-zlib", "bad-magic", "huge-name", "exists"])
def test_a_damaged_start_pack_stops_with_one_line(tmp_path: Path, unpacker: Path,
                                                  case: str) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy2(shutil.which("true") or "/bin/true", folder / "edgerun-agent")
    good = member(b"ok", b"fine")
    if case == "escape":
        hostile(folder, good, member(b"../outside", b"x"))
    elif case == "absolute":
        hostile(folder, member(str(tmp_path / "abs").encode(), b"x"))
    elif case == "truncated":
        hostile(folder, good[:-3], end=False)
    elif case == "no-end":
        hostile(folder, good, end=False)
    elif case == "wrong-size":
        hostile(folder, member(b"big", b"x" * 100, size=99))
    elif case == "not-zlib":
        hostile(folder, struct.pack("<IIQQ", 1, 0o644, 4, 4) + b"n" + b"junk")
    elif case == "bad-magic":
        (folder / packs.ZPACK).write_bytes(b"NOTAPACK" + b"\0" * 64)
    elif case == "huge-name":
        hostile(folder, struct.pack("<IIQQ", 2**31, 0o644, 1, 1) + b"x" * 64)
    elif case == "exists":
        (folder / "ok").write_bytes(b"already")
        hostile(folder, good)
    done = run(folder, unpacker)
    assert done.returncode == 127, (case, done)
    assert done.stderr.startswith("edgerun-agent: cannot unpack "), done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert not (tmp_path / "outside").exists() and not (tmp_path / "abs").exists()


# --- the OpenSSL pack, unpacked by the runtime hook ----------------------------------------
def test_tls_pack_is_unpacked_at_the_first_trigger_only(tmp_path: Path) -> None:
    hook = load("rth_tls")  # no sys._MEIPASS here: it installs nothing
    folder = folder_with(tmp_path, FILES)
    finder = hook.UnpackFirst(str(folder))
    assert finder.find_spec("json") is None
    assert (folder / packs.XPACK).exists() and not (folder / "libcrypto.so.3").exists()
    assert finder.find_spec("_hashlib") is None  # it finds nothing: it only unpacks
    for name, data in FILES.items():
        if packs.deferred(name):
            assert (folder / name).read_bytes() == data, name
    assert not (folder / packs.XPACK).exists()
    assert not list(folder.rglob("*.part"))
    assert finder.find_spec("_ssl") is None  # again: nothing left to do


@pytest.mark.parametrize("case", ["truncated", "escape", "garbage"])
def test_a_damaged_tls_pack_is_an_import_error(tmp_path: Path, case: str) -> None:
    import lzma
    hook = load("rth_tls")
    folder = tmp_path / "run"
    folder.mkdir()
    pack = folder / packs.XPACK
    if case == "truncated":
        packs.write_packs(str(tmp_path), [], str(tmp_path / "z"), str(pack))
        pack.write_bytes(pack.read_bytes()[:-20])
    elif case == "escape":
        body = struct.pack("<IIQQ", 10, 0o644, 1, 1) + b"../outside" + b"x"
        pack.write_bytes(lzma.compress(b"ERXPACK1" + body + struct.pack("<IIQQ", 0, 0, 0, 0)))
    else:
        pack.write_bytes(b"\xfd7zXZ\0" + os.urandom(100))
    with pytest.raises(ImportError, match=r"cannot unpack|corrupt|truncated"):
        hook.UnpackFirst(str(folder)).find_spec("_ssl")
    assert not (tmp_path / "outside").exists()
