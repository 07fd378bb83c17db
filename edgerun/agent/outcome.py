"""What a runner is given (Control) and what it returns (Outcome)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from edgerun.protocol import Error, ErrorCode, State


@dataclass
class Control:
    """How a running task is stopped: a cancel event, a deadline and the reason to give."""

    deadline: float  # time.monotonic() value
    cancel: threading.Event = field(default_factory=threading.Event)
    why: str = ""

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
