"""Keep the idle agent small: defer standard-library imports nothing at idle uses.

paho-mqtt imports three modules at the top of its client module that an agent
on a plain `mqtt://` broker never uses while idle:

- `urllib.request`, only to read proxy settings when PySocks is installed (it
  is not, for the agent). It pulls in http.client, email, tempfile, shutil,
  bz2 and lzma: about 2.4 MiB of RSS.
- `ssl`, for `mqtts://`. It loads OpenSSL (libssl and libcrypto): about
  4 MiB of RSS and, in the frozen agent, tens of milliseconds of start-up.
- `hashlib`, for the WebSocket handshake (and `edgerun.ed25519` for signed
  tasks, the downloader for sha256). It loads libcrypto too.

A stand-in module takes the place of each and imports the real one on the first
attribute asked of it: `ssl` when a TLS connection is set up, `hashlib` on the
first signed task or download, `urllib.request` when requests needs it. paho's
`except ssl.SSLWantReadError/SSLWantWriteError` clauses around recv and send,
evaluated at every socket error, get an exception class nothing raises while
`ssl` is not loaded (no SSL socket can exist before it is) and the real ones
after. Nothing changes for a TLS user but the moment OpenSSL is loaded. A
module that is already imported is left alone.
"""

from __future__ import annotations

import importlib
import sys
import threading
import types
from typing import Any

_DEFERRED = ("urllib.request", "ssl", "hashlib")
_lock = threading.RLock()  # importing one real module may ask another stand-in


class _NeverRaised(Exception):
    """What paho's `except ssl.SSLWantReadError:` clauses catch while `ssl` is not loaded:
    no SSL socket can exist then, so no SSL exception can be raised."""


# paho names these in `except` clauses around every recv and send; evaluating one (on any
# socket error, a would-block included) must not load OpenSSL for a plain mqtt:// agent.
_PAHO_EXCEPT = {("ssl", "SSLWantReadError"), ("ssl", "SSLWantWriteError")}


class _Deferred(types.ModuleType):
    """Stands in for a module until one of its attributes is used."""

    def __getattr__(self, attr: str) -> Any:  # only for attributes the stand-in lacks
        name = self.__name__
        if (name, attr) in _PAHO_EXCEPT and sys.modules.get(name) is self and \
                sys._getframe(1).f_globals.get("__name__") == "paho.mqtt.client":
            return _NeverRaised
        with _lock:
            if sys.modules.get(name) is self:
                del sys.modules[name]
            real = importlib.import_module(name)  # also rebinds urllib.request
        return getattr(real, attr)


def sha256_hex(data: bytes) -> str:
    """sha256 of a few bytes without loading libcrypto (hashlib's built-in fallback
    implementation; the same digest)."""
    for name in ("_sha2", "_sha256", "hashlib"):  # _sha2 from Python 3.12, _sha256 before
        try:
            module: Any = importlib.import_module(name)
            break
        except ImportError:
            continue
    return str(module.sha256(data).hexdigest())


def defer_unused_imports() -> None:
    for name in _DEFERRED:
        if name in sys.modules:
            continue
        stand_in = _Deferred(name)
        stand_in.__spec__ = None  # the import system reads it; it must not load the module
        sys.modules[name] = stand_in
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(importlib.import_module(parent), child, stand_in)  # what `import` binds
