"""Rollouts: one task over many nodes in waves, with an abort rule, pause and resume.

- `batch`: a sliding window: at most N targets in progress at once; the next
  starts as soon as one ends (Salt's --batch, not fixed waves).
- `rate`: at most N targets started per minute, evenly spaced (AWS IoT Jobs'
  maximumPerMinute). With both, both hold.
- `abort_after`: N failures, or P% of the finished targets once at least
  `abort_min` have finished (AWS IoT Jobs pairs a percentage with a minimum
  sample). A failure is any end but `succeeded` after the last retry:
  failed, timed_out, rejected, canceled by the node, lost, unreachable.
- **An offline node fails fast**: when its turn comes and the node is not
  online, its task ends `lost` with code `unreachable` at once and counts as
  a failure; a task sent to a node that then goes offline ends `lost` after
  `--offline-grace`. No offline node holds a window slot for longer.
- On abort: nothing more is started; targets not yet started are canceled in
  the store (never sent) and those sent but not yet running get a `cancel`
  with `"if_queued": true`: withdrawn if still queued on the node, left to
  finish (and counted) if it started meanwhile, whatever the scheduler last
  heard. A rollout never kills running work. The reason is recorded.

Every target's task exists from the start (state `queued`, hold `rollout`), so
the store shows each target's state from the first moment, and a restarted
service carries on where it was.
"""

from __future__ import annotations

import functools
import logging
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edgerun.control.errors import BadRequest, Conflict, NotFound
from edgerun.control.retries import check_room, parse_retry, will_retry
from edgerun.protocol import JSONObject
from edgerun.scheduler.core import Core
from edgerun.scheduler.fleet.pacing import Fleet
from edgerun.scheduler.store.fleetdb import AttemptState
from edgerun.scheduler.store.records import FINAL, TaskRow
from edgerun.scheduler.store.tasks import Change

log = logging.getLogger(__name__)

DEFAULT_ABORT_MIN = 10
SKIPPED = "rollout_aborted"  # error code of a target canceled before it started
UNREACHABLE = "unreachable"  # error code of a target whose node was offline at its turn
STATES = ("running", "paused", "aborted", "finished")
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|m|min|h|hour))?\s*$")
_ABORT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%?)\s*$")


@dataclass(frozen=True)
class RolloutOptions:
    batch: int | None = None
    rate: float | None = None
    """targets started per minute"""
    abort_count: int | None = None
    abort_percent: float | None = None
    abort_min: int = DEFAULT_ABORT_MIN

    def to_json(self) -> JSONObject:
        return {"batch": self.batch, "rate": self.rate, "abort_count": self.abort_count,
                "abort_percent": self.abort_percent, "abort_min": self.abort_min}

    @classmethod
    def from_json(cls, obj: JSONObject) -> RolloutOptions:
        return cls(obj.get("batch"), obj.get("rate"), obj.get("abort_count"),
                   obj.get("abort_percent"), int(obj.get("abort_min", DEFAULT_ABORT_MIN)))


def parse_rate(value: Any) -> float | None:
    """`10/min`, `2/s`, `100/h` or a bare number (per minute)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        text = str(value)
    elif isinstance(value, str):
        text = value
    else:
        raise BadRequest("`rate` must be N/min (also N/s, N/h)")
    match = _RATE.match(text)
    if match is None:
        raise BadRequest(f"bad rate {text!r}: write N/min, such as 10/min (also N/s, N/h)")
    number, unit = float(match.group(1)), (match.group(2) or "min")
    per_minute = number * {"s": 60, "sec": 60, "m": 1, "min": 1, "h": 1 / 60,
                           "hour": 1 / 60}[unit]
    if not 0 < per_minute <= 600_000:
        raise BadRequest(f"bad rate {text!r}: it must be more than 0")
    return per_minute


def parse_abort(value: Any) -> tuple[int | None, float | None]:
    """`3` (failures) or `10%` (of the finished targets): (count, percent)."""
    if value is None:
        return None, None
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str):
        raise BadRequest("`abort_after` must be a number of failures (3) or a percentage (10%)")
    match = _ABORT.match(text)
    if match is None:
        raise BadRequest(f"bad abort rule {text!r}: give a number of failures such as 3, or "
                         f"a percentage such as 10%")
    number, percent = float(match.group(1)), bool(match.group(2))
    if percent:
        if not 0 < number <= 100:
            raise BadRequest(f"bad abort rule {text!r}: a percentage must be over 0 and at "
                             f"most 100")
        return None, number
    if number != int(number) or number < 1:
        raise BadRequest(f"bad abort rule {text!r}: a number of failures must be a whole "
                         f"number of at least 1")
    return int(number), None


def parse_options(body: JSONObject) -> RolloutOptions:
    batch = body.get("batch")
    if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool)
                              or batch < 1):
        raise BadRequest("`batch` must be a whole number of at least 1")
    rate = parse_rate(body.get("rate"))
    count, percent = parse_abort(body.get("abort_after"))
    abort_min = body.get("abort_min", DEFAULT_ABORT_MIN)
    if not isinstance(abort_min, int) or isinstance(abort_min, bool) or abort_min < 1:
        raise BadRequest("`abort_min` must be a whole number of at least 1")
    if batch is None and rate is None:
        raise BadRequest("a rollout needs `batch` (targets in progress at once) or `rate` "
                         "(targets started per minute), or both")
    return RolloutOptions(batch, rate, count, percent, abort_min)


@dataclass
class Target:
    """One node of a rollout: its latest attempt and what it means for the rollout."""

    node: str
    task: AttemptState
    attempts: int

    @functools.cached_property
    def phase(self) -> str:
        """pending (not started), active (started, not ended), or the final state."""
        state, error = self.task.state, self.task.error
        if state == "queued" and self.task.hold == "rollout":
            return "pending"
        if state == "canceled" and error is not None and error.code == SKIPPED:
            return "skipped"
        if state in FINAL:
            return "active" if will_retry(self.task.to_json()) else str(state)
        return "active"


def targets_of(rows: list[AttemptState], order: list[str]) -> list[Target]:
    """The latest attempt of each node's chain, in the rollout's node order."""
    latest: dict[str, AttemptState] = {}
    count: dict[str, int] = {}
    for row in rows:
        node = row.node
        count[node] = count.get(node, 0) + 1
        if node not in latest or row.attempt >= latest[node].attempt:
            latest[node] = row
    return [Target(n, latest[n], count[n]) for n in order if n in latest]


def tally(targets: list[Target]) -> dict[str, int]:
    out = {"total": len(targets), "pending": 0, "active": 0, "succeeded": 0, "failed": 0,
           "skipped": 0}
    for target in targets:
        phase = target.phase
        if phase in ("pending", "active", "succeeded", "skipped"):
            out[phase] += 1
        else:
            out["failed"] += 1
    out["finished"] = out["succeeded"] + out["failed"]
    return out


def abort_reason(opts: RolloutOptions, targets: list[Target]) -> str | None:
    """Why the rollout must stop now, or None."""
    counts = tally(targets)
    failed, finished = counts["failed"], counts["finished"]
    if failed <= 0:
        return None
    examples = ", ".join(_why(t) for t in targets if t.phase not in (
        "pending", "active", "succeeded", "skipped"))[:400]
    if opts.abort_count is not None and failed >= opts.abort_count:
        return (f"{failed} target{'s' if failed > 1 else ''} failed, the limit is "
                f"{opts.abort_count} (--abort-after {opts.abort_count}): {examples}")
    if opts.abort_percent is not None:
        needed = min(opts.abort_min, counts["total"])
        share = 100.0 * failed / finished if finished else 0.0
        if finished >= needed and share >= opts.abort_percent:
            return (f"{failed} of {finished} finished targets failed ({share:.0f}%), the "
                    f"limit is {opts.abort_percent:g}% once {needed} have finished: "
                    f"{examples}")
    return None


def _why(target: Target) -> str:
    error = target.task.error
    code = f" ({error.code})" if error is not None and error.code else ""
    return f"{target.node} {target.task.state}{code}"


def view(rollout: JSONObject, rows: list[AttemptState]) -> JSONObject:
    """The rollout as the API and `edgerun rollout show` present it."""
    targets = targets_of(rows, rollout["nodes"])
    return {**rollout, "counts": tally(targets),
            "targets": [{"node": t.node, "phase": t.phase, "state": t.task.state,
                         "task": t.task.id, "attempts": t.attempts,
                         "error": t.task.error.to_dict() if t.task.error is not None
                         else None} for t in targets]}


class RolloutEngine:
    """Drives every rollout on the service's worker thread (see the module's docstring)."""

    def __init__(self, core: Core, fleet: Fleet) -> None:
        self.core, self.fleet, self.db = core, fleet, fleet.db
        self._dirty: set[str] = set()

    # --- requests (API threads) -------------------------------------------------------------
    def create(self, targets: Sequence[str], online: bool, spec: Any, options: JSONObject, *,
               where: Any = None, retry: Any = None) -> JSONObject:
        opts = parse_options(options)
        policy = parse_retry(retry)
        nodes = self.core.resolve(targets, online, where)
        # no default expiry: a target may start hours after the rollout was created
        task = self.core.build_task(spec, expiry=isinstance(spec, dict) and "expires_at" in spec)
        check_room(task.id, policy)
        self.core.require_broker()
        rollout_id = str(uuid.uuid4())

        def create() -> JSONObject:
            for node in nodes:
                if self.core.store.get(node, task.id) is not None:
                    raise Conflict(f"task id {task.id!r} already exists for node {node}; "
                                   f"leave the id out to get a fresh one")
            self.db.add_rollout(rollout_id, task.id, opts.to_json(), nodes)
            for node in nodes:
                if self.core.store.add_task(node, task, source="api") is None:
                    raise Conflict(f"task id {task.id!r} already exists for node {node}")
                self.db.set_fleet(node, task.id, hold="rollout", rollout_id=rollout_id,
                                  retry=policy.to_json() if policy else None)
                created = self.db.task(node, task.id)
                assert created is not None
                self.core.emit(Change(None, created))
            self.advance(rollout_id)
            return self.show(rollout_id)
        return self.core.call(create)

    def show(self, rollout_id: str) -> JSONObject:
        rollout = self.db.rollout(rollout_id)
        if rollout is None:
            raise NotFound(f"no rollout {rollout_id!r}")
        return view(rollout, self.db.rollout_states(rollout_id))

    def pause(self, rollout_id: str) -> JSONObject:
        self._require(rollout_id)
        if not self.db.set_rollout(rollout_id, state="paused", expect=("running",)):
            raise Conflict(f"rollout {rollout_id} is {self._state(rollout_id)}: only a "
                           f"running rollout can be paused")
        return self.show(rollout_id)

    def resume(self, rollout_id: str) -> JSONObject:
        self._require(rollout_id)
        if not self.db.set_rollout(rollout_id, state="running", expect=("paused",)):
            raise Conflict(f"rollout {rollout_id} is {self._state(rollout_id)}: only a "
                           f"paused rollout can be resumed")
        self.core.call(lambda: self.advance(rollout_id))
        return self.show(rollout_id)

    def abort(self, rollout_id: str, reason: str = "aborted by request") -> JSONObject:
        self._require(rollout_id)

        def stop() -> None:
            if not self._abort(rollout_id, reason):
                raise Conflict(f"rollout {rollout_id} is {self._state(rollout_id)}: "
                               f"nothing to abort")
        self.core.call(stop)
        return self.show(rollout_id)

    def _require(self, rollout_id: str) -> None:
        if self.db.rollout(rollout_id) is None:
            raise NotFound(f"no rollout {rollout_id!r}")

    def _state(self, rollout_id: str) -> str:
        rollout = self.db.rollout(rollout_id)
        return str(rollout["state"]) if rollout else "gone"

    # --- the worker ---------------------------------------------------------------------------
    # --- the fleet's rounds (fleet/pacing.py's Extension) ------------------------------------
    def on_final(self, task: TaskRow) -> None:
        if task.rollout:
            self.touch(task.rollout)

    def restart(self) -> None:
        """After a start: pick running rollouts up where they were."""
        for rollout in self.db.rollouts(state="running", limit=1_000_000):
            self.advance(rollout["id"])

    def touch(self, rollout_id: str) -> None:
        """A target of this rollout ended: look at it once more (coalesced)."""
        if rollout_id in self._dirty:
            return
        self._dirty.add(rollout_id)

        def again() -> None:
            self._dirty.discard(rollout_id)
            self.advance(rollout_id)
        self.core.submit(again)

    def tick(self) -> None:
        for rollout in self.db.rollouts(state="running", limit=1_000_000):
            if rollout["options"].get("rate"):
                self.advance(rollout["id"])

    def advance(self, rollout_id: str) -> None:
        rollout = self.db.rollout(rollout_id)
        if rollout is None or rollout["state"] != "running":
            return
        opts = RolloutOptions.from_json(rollout["options"])
        targets = targets_of(self.db.rollout_states(rollout_id), rollout["nodes"])
        reason = abort_reason(opts, targets)
        if reason is not None:
            self._abort(rollout_id, reason, targets)
            return
        counts = tally(targets)
        if counts["pending"] == 0 and counts["active"] == 0:
            self.db.set_rollout(rollout_id, state="finished", expect=("running",))
            log.info("rollout %s finished: %d succeeded, %d failed", rollout_id,
                     counts["succeeded"], counts["failed"])
            return
        room = opts.batch - counts["active"] if opts.batch else counts["pending"]
        if room <= 0:
            return
        interval = 60.0 / opts.rate if opts.rate else None
        online = self.core.store.online_nodes()
        for target in targets:
            if room <= 0:
                break
            if target.phase != "pending":
                continue
            task = target.task
            if not self.db.release_in_window(rollout_id, target.node, task.id, opts.batch,
                                             interval, time.time()):
                return  # the window or the rate is full (perhaps by another instance)
            room -= 1
            if target.node not in online:
                change = self.core.store.mark_lost(
                    target.node, task.id, "queued", UNREACHABLE,
                    f"node {target.node} was offline when its turn in rollout {rollout_id} "
                    f"came; it counts as a failure and the rollout goes on")
                if change is not None:
                    self.core.emit(change)
                return  # its end comes back through touch(): the abort rule first
            self.fleet.pump(target.node)

    def _abort(self, rollout_id: str, reason: str,
               targets: list[Target] | None = None) -> bool:
        if not self.db.set_rollout(rollout_id, state="aborted", reason=reason,
                                   expect=("running", "paused")):
            return False
        log.warning("rollout %s aborted: %s", rollout_id, reason)
        rollout = self.db.rollout(rollout_id)
        assert rollout is not None
        if targets is None:
            targets = targets_of(self.db.rollout_states(rollout_id), rollout["nodes"])
        why = f"rollout {rollout_id} was aborted before this target started: {reason}"
        for target in targets:
            task, node = target.task, target.node
            if task.state == "queued" and not self.fleet.is_sending(task):
                change = self.core.store.cancel_queued(node, task.id, SKIPPED, why[:1000])
                if change is not None:
                    self.core.emit(change)
            elif task.state in ("queued", "dispatched", "accepted"):
                self.core.send_cancel(node, task.id, if_queued=True)
        return True
