"""The scheduler's own tasks coming back: recognised by their bytes, never parsed again.

With `record_external` the scheduler subscribes to every node's tasks topic (or binds
`node.*` on the tasks exchange) so that tasks other clients publish are recorded. Its own
publishes come back the same way. They are already in the store, so parsing, validating
and writing each one again would only cost time: `Echoes` remembers a digest of every
payload the service sends (`sent`) and `take` recognises the echo (a dictionary lookup
on a 16-byte BLAKE2b digest) so that the service acknowledges it and moves on. A payload
sent to several nodes is remembered as many times. Memory is bounded: past `limit`
payloads in flight, the oldest are forgotten, and their echo is then recorded the slow way
(which finds it already stored and changes nothing).
"""

from __future__ import annotations

import hashlib
import threading


def _digest(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=16).digest()


class Echoes:
    """Digests of payloads sent and not yet seen back; thread-safe (API threads send)."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self.skipped = 0  # echoes recognised, for tests and /metrics
        self._pending: dict[bytes, int] = {}  # insertion order: oldest first
        self._count = 0
        self._lock = threading.Lock()

    def sent(self, payload: bytes) -> None:
        key = _digest(payload)
        with self._lock:
            self._pending[key] = self._pending.get(key, 0) + 1
            self._count += 1
            while self._count > self.limit:
                oldest = next(iter(self._pending))
                self._count -= self._pending.pop(oldest)

    def take(self, payload: bytes) -> bool:
        """True (and forgotten once) if `payload` is one the service sent itself."""
        key = _digest(payload)
        with self._lock:
            left = self._pending.get(key)
            if left is None:
                return False
            if left == 1:
                del self._pending[key]
            else:
                self._pending[key] = left - 1
            self._count -= 1
            self.skipped += 1
        return True

    def __len__(self) -> int:
        return self._count


__all__ = ["Echoes"]
