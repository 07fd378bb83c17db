"""Capped exponential back-off with jitter: a pure function and a sleeper."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable


def backoff_delay(attempt: int, *, base: float = 0.5, cap: float = 30.0,
                  rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry number `attempt` (0 for the first retry).

    "Equal jitter": half of min(cap, base * 2**attempt) is fixed, the other half
    random, so thousands of agents returning after a broker restart spread out
    and none of them hammers the broker with near-zero waits.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    ceiling = min(cap, base * 2.0 ** min(attempt, 62))
    return ceiling / 2.0 + rand() * ceiling / 2.0


class Backoff:
    """Counts failed attempts and waits on a stop event, so shutdown is immediate."""

    def __init__(self, stop: threading.Event, *, base: float = 0.5, cap: float = 30.0) -> None:
        self.stop, self.base, self.cap = stop, base, cap
        self.attempt = 0

    def reset(self) -> None:
        self.attempt = 0

    def wait(self, grow: bool = True) -> bool:
        """Sleep the next delay; True when the stop event ended the wait. `grow=False`
        waits the current step again (a client going round a cluster's nodes grows its
        back-off once per round, not once per node)."""
        delay = backoff_delay(self.attempt, base=self.base, cap=self.cap)
        if grow:
            self.attempt += 1
        return self.stop.wait(delay)
