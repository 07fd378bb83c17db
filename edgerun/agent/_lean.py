"""Keep the idle agent small: defer a standard-library import nothing at idle uses.

paho-mqtt imports `urllib.request` at the top of its client module, only to read
proxy settings when PySocks is installed (it is not, for the agent). That import
pulls in http.client, email, tempfile, shutil, bz2 and lzma: about 2.4 MiB of
RSS in every agent. A stand-in module takes its place and imports the real one
on the first attribute asked of it (requests does, on the first download).
"""

from __future__ import annotations

import importlib
import sys
import threading
import types
from typing import Any

_NAME = "urllib.request"


class _Deferred(types.ModuleType):
    """Stands in for a module until one of its attributes is used."""

    _lock = threading.Lock()

    def __getattr__(self, attr: str) -> Any:  # only for attributes the stand-in lacks
        with _Deferred._lock:
            if sys.modules.get(_NAME) is self:
                del sys.modules[_NAME]
            real = importlib.import_module(_NAME)  # also rebinds urllib.request
        return getattr(real, attr)


def defer_unused_imports() -> None:
    if _NAME in sys.modules:
        return
    import urllib

    stand_in = _Deferred(_NAME)
    stand_in.__spec__ = None  # the import system reads it; it must not load the module
    sys.modules[_NAME] = stand_in
    urllib.request = stand_in  # type: ignore[attr-defined]  # what `import` would bind
