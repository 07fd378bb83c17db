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


class Rotation:
    """Round robin over the nodes of one cluster, with back-off between attempts.

    `index` is the node to try. After a failed attempt or a lost connection, `wait()`
    moves to the next node and sleeps the back-off first; the back-off grows once per
    round of the list (when it comes back to `first`), not at every node: while a
    cluster elects new leaders after a loss, several nodes may refuse in a row, and the
    next round should still come soon. A connection that was up resets it (`up()`).
    """

    def __init__(self, count: int, stop: threading.Event, *, first: int = 0,
                 base: float = 0.5, cap: float = 30.0,
                 rand: Callable[[], float] = random.random) -> None:
        if count < 1:
            raise ValueError("a rotation needs at least one node")
        self.count, self.stop, self.base, self.cap, self.rand = count, stop, base, cap, rand
        self.first = self.index = first % count
        self.attempt = 0  # rounds of the list that failed since the last connection

    def up(self) -> None:
        """A connection was up: the next wait is short again."""
        self.attempt = 0

    def next(self) -> float:
        """Move to the next node; returns the seconds to wait before trying it."""
        delay = backoff_delay(self.attempt, base=self.base, cap=self.cap, rand=self.rand)
        self.index = (self.index + 1) % self.count
        if self.index == self.first:  # a whole round failed
            self.attempt += 1
        return delay

    def wait(self) -> bool:
        """`next()`, then sleep; True when the stop event ended the wait."""
        return self.stop.wait(self.next())


def first_node(count: int, rand: Callable[[int], int] = random.randrange) -> int:
    """Where a client starts in its list of a cluster's nodes: a random one, so that
    clients given the same list (the bridge, the scheduler's instances, after every
    restart) spread over the nodes instead of all landing on the first."""
    return rand(count) if count > 1 else 0
