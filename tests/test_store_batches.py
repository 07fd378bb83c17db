"""Updates that arrive together end exactly as one by one would, whatever their order:
random batches (late, duplicate, out-of-order and unknown-task updates mixed) applied
with `Store.apply_updates` on one store and one at a time with `apply_update` on
another, compared row by row and history by history, on SQLite and PostgreSQL. The
second pass over what the first refused (late updates, common when several instances
share a task's updates) is what this holds to the one-by-one rules."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from edgerun.protocol import ShellTask, parse_update
from edgerun.scheduler.store.tasks import Store

from .pg import pg_database, pg_url  # noqa: F401  (fixtures)

STATES = ["accepted", "running", "succeeded", "failed", "running", "accepted"]


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "together.db")
    return str(request.getfixturevalue("pg_url"))


def _body(node: str, task_id: str, state: str, n: int) -> dict[str, Any]:
    body: dict[str, Any] = {"v": 1, "kind": "update", "id": task_id, "node": node,
                            "state": state, "at": f"2026-01-01T00:00:{n % 60:02d}.000Z"}
    if state in ("succeeded", "failed"):
        body.update(exit_code=0 if state == "succeeded" else 3, stdout=f"{task_id} {n}\n",
                    stderr="", truncated=False, duration_s=0.1)
        if state == "failed":
            body["error"] = {"code": "exit_status", "message": "exited 3"}
    return body


@pytest.mark.parametrize("seed", range(12))
def test_random_batches_end_as_one_by_one(target: str, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    keys = [(f"n{i % 3}", f"t{i}") for i in range(8)]
    known = keys[:6]  # the last two are known only from their updates
    batches = [[_body(*rng.choice(keys), rng.choice(STATES), n)
                for n in range(rng.randint(1, 14))] for _ in range(4)]
    together, alone = Store(target), Store(str(tmp_path / f"alone{seed}.db"))
    try:
        for store in (together, alone):
            for node, task_id in known:
                store.add_task(node, ShellTask(id=task_id, command="true"), source="api")
        for batch in batches:
            got = together.apply_updates([(parse_update(b), b) for b in batch], grace=30.0,
                                         now=1000.0)
            want = [alone.apply_update(parse_update(b), b, grace=30.0, now=1000.0)
                    for b in batch]
            assert [(c.previous, c.task.state) if c else None for c in got] == \
                [(c.previous, c.task.state) if c else None for c in want], batch
        for node, task_id in keys:
            one, other = together.get(node, task_id), alone.get(node, task_id)
            assert (one is None) == (other is None)
            if one is not None and other is not None:
                assert (one.state, one.result, one.exit_code, one.deadline, one.error) == \
                    (other.state, other.result, other.exit_code, other.deadline, other.error)
            assert [(u["state"], u["at"]) for u in together.updates(node, task_id)] == \
                [(u["state"], u["at"]) for u in alone.updates(node, task_id)]
    finally:
        together.close()
        alone.close()
