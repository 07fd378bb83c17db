"""Give freed heap back to the system after bursts (issue 23: the small mode comes back to
within 10 MiB of idle after a hostile burst).

A burst of large or deeply nested bodies and cut-off streams leaves the C heap with
free pages glibc keeps; the RSS then stays 6-12 MiB over idle (bench/hostile_memory.py)
although nothing is held. glibc's malloc_trim(3) returns them. The API calls it at most
every TRIM_EVERY_S, and only after requests came, from a worker thread. Where the C
library has no malloc_trim (musl), nothing happens."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

TRIM_EVERY_S = 10.0


def malloc_trim() -> Callable[[], None] | None:
    """glibc's malloc_trim(0), or None where there is none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int

    def call() -> None:
        trim(0)
    return call


class Trimmer:
    """Counts requests; `due()` says whether some came since the last trim."""

    def __init__(self) -> None:
        self.trim = malloc_trim()
        self.requests = 0
        self._seen = 0

    def note(self) -> None:
        self.requests += 1

    def due(self) -> bool:
        if self.trim is None or self.requests == self._seen:
            return False
        self._seen = self.requests
        return True
