"""store/advance.py: updates stepped in memory give what one guarded UPDATE each gave.

A pure unit test (no I/O): rows are dicts, the state machine is the contract's, the
task records are the store's own (records.TaskRow).
The same paths against SQLite and PostgreSQL are in test_scheduler_store.py and
test_store_commit.py (Store.apply_updates uses this)."""

from __future__ import annotations

import json
from typing import Any

from edgerun.protocol import DEFAULT_TIMEOUT_S, State, Update, can_transition
from edgerun.protocol.messages import Error
from edgerun.scheduler.store.advance import NEW, WRITTEN, Stepper, update_columns


def sources(state: State) -> tuple[str, ...]:
    return tuple(NEW if s is None else str(s) for s in (None, *State) if can_transition(s, state))


def row(task_id: str, state: str, **cols: Any) -> dict[str, Any]:
    base = {"node": "n1", "id": task_id, "state": state, "previous": None, "timeout": None,
            "updated_at": "t0", "dispatched_at": None, "deadline": None, "expires_ts": 99.0,
            "expires_at": None, "exit_code": None, "error_code": None, "error_message": None,
            "result": None, "hold": None, "type": "shell", "source": "api",
            "created_at": "t0", "spec": json.dumps({"parsed": True}), "job_id": None,
            "step": None, "attempt": 1, "parent_id": None, "root_id": None, "retry": None,
            "rollout_id": None}
    return {**base, **cols}


def upd(task_id: str, state: State, **kw: Any) -> tuple[Update, dict[str, Any]]:
    update = Update(task_id, "n1", state, "2026-12-07T00:00:00Z", **kw)
    return update, update.to_dict()


def step_all(stepper: Stepper, updates: list[tuple[Update, dict[str, Any]]]) -> None:
    for i, (u, body) in enumerate(updates):
        current = stepper.current((u.node, str(u.id)))
        stepper.step(i, (u.node, str(u.id)), u.state,
                     update_columns(u, body, 5.0, 1000.0,
                                    current["timeout"] if current else None), ("h", i))


def test_three_updates_of_one_task_are_one_write_and_three_steps() -> None:
    stepper = Stepper({("n1", "a"): row("a", "dispatched", timeout=60.0)}, sources, "T")
    step_all(stepper, [upd("a", State.ACCEPTED), upd("a", State.RUNNING),
                       upd("a", State.SUCCEEDED, exit_code=0, stdout="hi")])
    plan = stepper.finish()
    assert [(s.index, s.previous, s.task.state) for s in plan.steps] == [
        (0, "dispatched", "accepted"), (1, "accepted", "running"), (2, "running", "succeeded")]
    assert plan.rest == [] and len(plan.writes) == 1
    written = dict(zip(WRITTEN, plan.writes[0], strict=False))
    assert written["state"] == "succeeded" and written["previous"] == "running"
    assert written["deadline"] is None and written["expires_ts"] is None
    assert written["exit_code"] == 0 and json.loads(written["result"]) == {
        "exit_code": 0, "stdout": "hi"}
    assert plan.writes[0][-2:] == ("n1", "a")
    # the running step carried the deadline now + timeout + grace, and no result yet
    assert plan.steps[1].task.deadline == 1000.0 + 60.0 + 5.0
    assert plan.steps[1].task.result is None
    assert plan.steps[2].task.result == {"exit_code": 0, "stdout": "hi"}
    assert all(s.task.spec == {"parsed": True} for s in plan.steps)


def test_a_late_running_never_reopens_and_duplicates_go_the_one_by_one_way() -> None:
    stepper = Stepper({("n1", "a"): row("a", "running")}, sources, "T")
    step_all(stepper, [upd("a", State.FAILED, exit_code=1), upd("a", State.RUNNING),
                       upd("a", State.FAILED, exit_code=1)])
    plan = stepper.finish()
    assert [s.index for s in plan.steps] == [0]
    assert plan.rest == [1, 2]  # refused here: the one-by-one path keeps their first copy
    assert dict(zip(WRITTEN, plan.writes[0], strict=False))["state"] == "failed"


def test_unknown_task_is_left_whole_to_the_one_by_one_way_in_order() -> None:
    stepper = Stepper({}, sources, "T")
    step_all(stepper, [upd("x", State.ACCEPTED), upd("x", State.SUCCEEDED)])
    plan = stepper.finish()
    assert plan.steps == [] and plan.writes == [] and plan.rest == [0, 1]


def test_open_update_without_timeout_uses_the_default_and_keeps_the_exit_code() -> None:
    stepper = Stepper({("n1", "a"): row("a", "dispatched", exit_code=7)}, sources, "T")
    step_all(stepper, [upd("a", State.ACCEPTED)])
    written = dict(zip(WRITTEN, stepper.finish().writes[0], strict=False))
    assert written["deadline"] == 1000.0 + DEFAULT_TIMEOUT_S + 5.0
    assert written["exit_code"] == 7  # an update without one keeps the row's


def test_error_and_hold_follow_the_step() -> None:
    stepper = Stepper({("n1", "a"): row("a", "queued", hold="wait")}, sources, "T")
    assert stepper.step(0, ("n1", "a"), State.DISPATCHED,
                        {"dispatched_at": "D", "deadline": 50.0, "expires_ts": None}, None)
    assert stepper.step(1, ("n1", "a"), State.REJECTED,
                        update_columns(Update("a", "n1", State.REJECTED, "t",
                                              error=Error("bad_task", "no")), {}, 5.0, 1.0,
                                       None), None)
    plan = stepper.finish()
    assert plan.steps[0].task.hold is None and plan.steps[0].previous == "queued"
    assert plan.steps[1].task.error == Error("bad_task", "no")
    assert plan.steps[1].task.to_json()["error"] == {"code": "bad_task", "message": "no"}
    written = dict(zip(WRITTEN, plan.writes[0], strict=False))
    assert written["dispatched_at"] == "D" and written["error_code"] == "bad_task"
