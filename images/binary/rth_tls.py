"""PyInstaller runtime hook: unpack OpenSSL when `_ssl` or `_hashlib` is first imported.

The static agent (images/binary/staticx_onedir.py) keeps what only TLS and
hashing need (libssl, libcrypto, `_ssl`, `_hashlib`, certifi's CA bundle: 6 MB)
in `edgerun-agent.xpack`, xz-compressed, instead of unpacking it at every start:
a plain mqtt:// agent loads none of it until its first download or signed task,
and xz would spend 0.09 s on it. This finder unpacks the pack into the folder
the first time either module is looked for, then lets the ordinary finders load
it. A folder without the pack (the discovery image's copy) is left alone.
"""

import os
import struct
import sys
import threading

_PACK = "edgerun-agent.xpack"
_MAGIC = b"ERXPACK1"
_TRIGGERS = frozenset({"_ssl", "_hashlib"})
_WRITE = 16 * 1024


def _unpack(folder: str, pack: str) -> None:
    import importlib

    # the C part only: the agent leaves `lzma` out, or shutil would load liblzma at start
    import _lzma

    decompressor = _lzma.LZMADecompressor(_lzma.FORMAT_XZ)
    with open(pack, "rb") as fh:
        data = decompressor.decompress(fh.read())
    if not decompressor.eof:
        raise ImportError(f"{pack}: truncated")
    if not data.startswith(_MAGIC):
        raise ImportError(f"{pack}: not a pack")
    at = len(_MAGIC)
    while True:
        name_len, mode, size, stored = struct.unpack_from("<IIQQ", data, at)
        at += 24
        if name_len == 0:
            break
        name = data[at:at + name_len].decode()
        at += name_len
        if size != stored or name.startswith("/") or ".." in name or at + size > len(data):
            raise ImportError(f"{pack}: corrupt member {name!r}")
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        part = f"{path}.part"
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "wb") as out:  # buffered: it finishes partial writes
            # in small writes: the page cache would keep one large write in large
            # folios, mapped whole when the library loads (more resident memory)
            view = memoryview(data)[at:at + size]
            for piece in range(0, size, _WRITE):
                out.write(view[piece:piece + _WRITE])
        os.replace(part, path)
        at += size
    os.unlink(pack)
    importlib.invalidate_caches()  # the lib-dynload directory has new files


class UnpackFirst:
    """A meta path finder that unpacks the folder's pack when a trigger module is first
    looked for, then lets the ordinary finders load it (it finds nothing itself)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.pack = os.path.join(folder, _PACK)
        self.lock = threading.Lock()

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name in _TRIGGERS:
            with self.lock:
                if os.path.exists(self.pack):
                    try:
                        _unpack(self.folder, self.pack)
                    except ImportError:
                        raise
                    except Exception as exc:  # a disk full, a bad pack
                        raise ImportError(f"cannot unpack {self.pack}: {exc}") from exc
        # It stays in sys.meta_path: removing it while the import system iterates that
        # list would skip the next finder.


def _install() -> None:
    meipass = getattr(sys, "_MEIPASS", None)
    if isinstance(meipass, str) and os.path.exists(os.path.join(meipass, _PACK)):
        sys.meta_path.insert(0, UnpackFirst(meipass))


_install()
