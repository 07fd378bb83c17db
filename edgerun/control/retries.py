"""Retries: `--retries N` with back-off for the outcomes chosen by `--retry-on`.

Each attempt is a task of its own: attempt k (k >= 2) of task `ID` has id
`ID.aK`, records its attempt number, its parent (the attempt before) and the
first attempt's id (`root`), so the history shows every attempt. An attempt is
created only when the one before has ended, and after a `lost` one the
scheduler first sends the node a `cancel` of the lost attempt, on the same
topic ahead of the new one: an agent that was only cut off kills it before it
takes the next, so two attempts never run at once.

The outcomes: `failed`, `timed_out`, `lost`, and `busy` (`rejected` with
code busy, the agent's queue was full). Everything else is final, and so is a
rollout target that was `lost` as `unreachable` (its node was offline when its
turn came: a retry would only hold the rollout's window).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgerun.backoff import backoff_delay
from edgerun.control.errors import BadRequest
from edgerun.protocol import JSONObject, is_task_id

OUTCOMES = ("failed", "timed_out", "lost", "busy")
DEFAULT_ON = OUTCOMES
DEFAULT_DELAY_S = 5.0
MAX_RETRIES = 20
MAX_DELAY_S = 600.0


@dataclass(frozen=True)
class RetryPolicy:
    retries: int
    on: tuple[str, ...] = DEFAULT_ON
    delay: float = DEFAULT_DELAY_S

    def to_json(self) -> JSONObject:
        return {"retries": self.retries, "on": list(self.on), "delay": self.delay}

    def wait(self, attempt: int) -> float:
        """Seconds before attempt number `attempt` (2 for the first retry): half of
        delay * 2**(attempt-2) fixed, half random, at most MAX_DELAY_S."""
        return backoff_delay(max(attempt - 2, 0), base=self.delay, cap=MAX_DELAY_S)


def parse_retry(obj: Any) -> RetryPolicy | None:
    """A request's `retry` object ({"retries": N, "on": [...], "delay": S}); None: none."""
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise BadRequest("`retry` must be an object: {\"retries\": N, \"on\": [...], "
                         "\"delay\": S}")
    unknown = set(obj) - {"retries", "on", "delay"}
    if unknown:
        raise BadRequest(f"`retry` has an unknown key `{sorted(unknown)[0]}` (retries, on, "
                         f"delay)")
    retries = obj.get("retries")
    if not isinstance(retries, int) or isinstance(retries, bool) or \
            not 0 <= retries <= MAX_RETRIES:
        raise BadRequest(f"`retry.retries` must be a whole number from 0 to {MAX_RETRIES}")
    on = obj.get("on", list(DEFAULT_ON))
    if isinstance(on, str):
        on = [p.strip() for p in on.split(",") if p.strip()]
    if not isinstance(on, list) or not on or not all(isinstance(o, str) for o in on):
        raise BadRequest(f"`retry.on` must be a non-empty list of {', '.join(OUTCOMES)}")
    bad = [o for o in on if o not in OUTCOMES]
    if bad:
        raise BadRequest(f"`retry.on`: {bad[0]!r} is not an outcome to retry; choose from "
                         f"{', '.join(OUTCOMES)}")
    delay = obj.get("delay", DEFAULT_DELAY_S)
    if not isinstance(delay, (int, float)) or isinstance(delay, bool) or \
            not 0 <= delay <= MAX_DELAY_S:
        raise BadRequest(f"`retry.delay` must be seconds from 0 to {MAX_DELAY_S:g}")
    if retries == 0:
        return None
    return RetryPolicy(retries, tuple(dict.fromkeys(on)), float(delay))


def policy_of(task: JSONObject) -> RetryPolicy | None:
    raw = task.get("retry")
    if not isinstance(raw, dict):
        return None
    return RetryPolicy(int(raw["retries"]), tuple(raw["on"]), float(raw["delay"]))


def outcome(task: JSONObject) -> str | None:
    """Which retryable outcome a final task had, if any."""
    state = task["state"]
    error = task.get("error") or {}
    if state == "lost" and error.get("code") == "unreachable":
        return None  # a rollout's node offline at its turn: the rollout goes on without it
    if state in ("failed", "timed_out", "lost"):
        return str(state)
    if state == "rejected" and error.get("code") == "busy":
        return "busy"
    return None


def will_retry(task: JSONObject) -> bool:
    """True when this ended attempt is followed by another one."""
    policy = policy_of(task)
    if policy is None:
        return False
    attempt = int(task.get("attempt") or 1)
    return attempt <= policy.retries and outcome(task) in policy.on


def root_of(task: JSONObject) -> str:
    return str(task.get("root") or task["id"])


def attempt_id(root: str, attempt: int) -> str:
    return root if attempt <= 1 else f"{root}.a{attempt}"


def check_room(task_id: str, policy: RetryPolicy | None) -> None:
    """The attempts' ids must be valid task ids too."""
    if policy is not None and not is_task_id(attempt_id(task_id, policy.retries + 1)):
        raise BadRequest(f"task id {task_id!r} is too long for retries: attempt ids add "
                         f"`.aN` and must stay within 128 characters")


def attempt_ids(task_id: str, retries: int) -> list[str]:
    """Every id the attempts of `task_id` may get: what a follower subscribes to."""
    return [attempt_id(task_id, k) for k in range(1, retries + 2)]
