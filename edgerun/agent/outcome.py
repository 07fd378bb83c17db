"""What a runner is given (Control) and what it returns (Outcome)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from edgerun.protocol import Error, ErrorCode, State


class NotAdmitted(Exception):
    """The task was handed to a worker before its `accepted` was durable, and the
    dispatcher then failed to make it so: the worker must not run it, nor answer it
    (the dispatcher answered the message)."""


@dataclass
class Control:
    """How a running task is stopped: a cancel event, a deadline and the reason to give;
    and the gate its command waits at until its `accepted` is on disk (open by default)."""

    deadline: float  # time.monotonic() value
    cancel: threading.Event = field(default_factory=threading.Event)
    why: str = ""
    # Held while the dispatcher makes `accepted` durable, so that the worker prepares the
    # command (cgroup, environment) meanwhile and forks only afterwards: a C-level lock,
    # one wake-up, where an Event would be a Condition and its own lock.
    _gate: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _admitted: bool = True

    def hold(self) -> None:
        """Close the gate: the task may not start until admit()."""
        self._gate.acquire()
        self._admitted = False

    def admit(self, ok: bool = True) -> None:
        """Open the gate: the task may start (ok) or must not (the dispatcher failed)."""
        self._admitted = ok
        self._gate.release()

    def admitted(self) -> bool:
        """Wait at the gate; True when the task may start."""
        with self._gate:
            return self._admitted

    @classmethod
    def for_timeout(cls, timeout_s: float) -> Control:
        return cls(deadline=time.monotonic() + min(timeout_s, 30 * 86400.0))

    def stop(self, why: str) -> None:
        self.why = why
        self.cancel.set()


@dataclass
class Outcome:
    """A final state and the update fields that go with it."""

    state: State
    fields: dict[str, Any]


def failure(code: ErrorCode, message: str, *, state: State = State.FAILED,
            **fields: Any) -> Outcome:
    return Outcome(state, {**fields, "error": Error(code, message)})
