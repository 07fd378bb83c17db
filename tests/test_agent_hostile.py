"""A live agent fed thousands of hostile messages keeps serving valid tasks between them.

Messages are generated from a fixed seed (so a failure can be replayed):
binary garbage, deep nesting, huge strings, oversized payloads, JSON of every
type, and valid tasks with one field swapped for a random value. Generated
strings come from a harmless alphabet: a mutated `command` that is still a
string really runs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from edgerun.protocol import ErrorCode, is_task_id

from .brokers import Mosquitto
from .mqttkit import AgentProcess, Observer, shell

SEED = 20261122
BATCHES, BATCH = 15, 200
SAFE_TEXT = ["", "x", "é", "\u2028", "\x00", "\x7f", "{}", "[", "0", "-1", "/", "/tmp",
             "%s%n", "true", "📦", "\\", '"', "null"]
CODES = {str(c) for c in ErrorCode}


def random_value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(9 if depth < 3 else 6)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, -1, 1, 2**63, -(2**70), 255, 256])
    if choice == 3:
        return rng.choice([0.0, -0.5, 1e-9, 1e300, 3.14])
    if choice in (4, 5):
        return rng.choice(SAFE_TEXT) * rng.choice([1, 2, 50])
    if choice == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(SAFE_TEXT): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def hostile(rng: random.Random, number: int) -> tuple[bytes, str | None]:
    """One hostile payload, and the task id it carries if any."""
    kind = rng.randrange(8)
    if kind == 0:
        return rng.randbytes(rng.randrange(2000)), None
    if kind == 1:
        depth = rng.choice([100, 5000, 200_000])
        return (b"[" * depth + b"]" * depth) if rng.random() < 0.5 else \
            (b'{"a":' * depth + b"1" + b"}" * depth), None
    if kind == 2:
        return json.dumps(random_value(rng)).encode(), None
    if kind == 3:
        task_id = f"huge-{number}"
        size = rng.choice([100_000, 300_000, 600_000])
        return json.dumps(shell(task_id, "true", stdin="x" * size)).encode(), task_id
    task_id = f"h-{number}"
    task = shell(task_id, "true", timeout=5)
    field = rng.choice(["v", "kind", "type", "command", "env", "cwd", "stdin", "ok_codes",
                        "timeout", "expires_at", "sig", "url", "dest", "unknown_field"])
    task[field] = random_value(rng)
    if field == "command" and isinstance(task[field], list):
        task[field] = [len(str(v)) for v in task[field]] or 0  # never a runnable argv
    return json.dumps(task).encode(), task_id


def test_thousands_of_hostile_messages(mosquitto: Mosquitto, observer: Observer,
                                       tmp_path: Path) -> None:
    agent = AgentProcess(mosquitto.url, "node-h", tmp_path / "a", "--queue-size", "1000").start()
    agent.wait_online(observer)
    rng = random.Random(SEED)
    with_ids: list[str] = []
    for batch in range(BATCHES):
        for i in range(BATCH):
            payload, task_id = hostile(rng, batch * BATCH + i)
            observer.send("node-h", payload)
            if task_id is not None:
                with_ids.append(task_id)
        canary = f"canary-{batch}"
        observer.send("node-h", shell(canary, f"echo {canary}"))
        final = observer.final(canary, timeout=60)
        assert (final["state"], final["stdout"]) == ("succeeded", f"{canary}\n"), final
        assert agent.alive()
    finals = ("succeeded", "failed", "timed_out", "canceled", "rejected")
    assert len(with_ids) > 1000
    for task_id in with_ids:  # ids are never mutated: each message has exactly one ending
        assert is_task_id(task_id)
        updates = observer.updates(task_id)
        assert len([u for u in updates if u["state"] in finals]) == 1, updates
    codes = {u["error"]["code"] for u in observer.of("update") if u.get("error")}
    assert codes <= CODES
    assert "bad_message" in codes and "too_large" in codes
    assert agent.terminate() == 0
