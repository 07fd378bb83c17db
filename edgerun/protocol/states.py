"""The task state machine, as a table (PROTOCOL.md, "update")."""

from __future__ import annotations

import enum


class State(enum.StrEnum):
    # scheduler-side, before the agent has the task
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    # agent-side
    ACCEPTED = "accepted"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELED = "canceled"
    REJECTED = "rejected"
    # scheduler-side, when no final update came by the deadline
    LOST = "lost"


Q, D, A, R = State.QUEUED, State.DISPATCHED, State.ACCEPTED, State.RUNNING
OK, FAIL, TIME, CANC, REJ, LOST = (
    State.SUCCEEDED, State.FAILED, State.TIMED_OUT, State.CANCELED, State.REJECTED, State.LOST,
)

AGENT_STATES = frozenset({A, R, OK, FAIL, TIME, CANC, REJ})
"""The states an agent may put in an update."""

FINAL_STATES = frozenset({OK, FAIL, TIME, CANC, REJ, LOST})

# Which state may follow which. Updates travel at least once and, through
# several bridges, not always in order, so a state may be skipped (a task seen
# first through its final update) but never revisited. `lost` is the
# scheduler's verdict when nothing came in time; a late final update from the
# agent is better knowledge and replaces it. Other final states are terminal.
TRANSITIONS: dict[State | None, frozenset[State]] = {
    None: frozenset({Q, D, A, R, OK, FAIL, TIME, CANC, REJ}),
    Q:    frozenset({D, A, R, OK, FAIL, TIME, CANC, REJ, LOST}),
    D:    frozenset({A, R, OK, FAIL, TIME, CANC, REJ, LOST}),
    A:    frozenset({R, OK, FAIL, TIME, CANC, LOST}),
    R:    frozenset({OK, FAIL, TIME, CANC, LOST}),
    OK:   frozenset(),
    FAIL: frozenset(),
    TIME: frozenset(),
    CANC: frozenset(),
    REJ:  frozenset(),
    LOST: frozenset({OK, FAIL, TIME, CANC, REJ}),
}


def can_transition(current: State | None, new: State) -> bool:
    """True when a task in `current` (None: unknown so far) may move to `new`."""
    return new in TRANSITIONS[current]


def is_final(state: State) -> bool:
    return state in FINAL_STATES
