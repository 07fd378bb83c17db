"""Property: every task message with a readable id gets exactly one final answer.

Hypothesis generates the values a hostile or careless sender could put in a
task: extreme numbers (1e308, -0.0, integers of hundreds of digits), times at
the edges of the calendar in every offset, strings that are not encodable
(lone surrogates), NUL and control characters, duplicate keys, deep nesting
and long arrays. Each message goes to a LIVE agent through a real Mosquitto;
the agent must answer it (a `rejected` update with a contract code, or a final
update) and must go on serving. Commands are argv arrays that start with
/bin/echo, so a generated value can never run anything harmful.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgerun.protocol import ErrorCode

from .brokers import Mosquitto
from .mqttkit import AgentProcess, Observer, shell

CODES = {str(c) for c in ErrorCode}
FINALS = ("succeeded", "failed", "timed_out", "canceled", "rejected")

numbers = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308, -1e308, 5e-324, -0.0, 0.0, 1e-300, 2.0**53 + 1, 86400 * 365 * 1e4]),
    st.integers(),
    st.integers(min_value=10**18, max_value=10**400),
    st.integers(min_value=-(10**400), max_value=-(10**18)),
)
texts = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),
    st.text(st.characters(max_codepoint=0x1F), max_size=10),
    st.sampled_from(["NaN", "Infinity", "-0", "1e999", "0x10", "", " ", "null", "\x00"]),
)
offsets = st.builds(lambda sign, h, m: f"{sign}{h:02d}:{m:02d}",
                    st.sampled_from("+-"), st.integers(0, 23), st.integers(0, 59))
times = st.one_of(
    st.builds(lambda d, z: d.isoformat(timespec="milliseconds") + z, st.datetimes(),
              st.one_of(offsets, st.just("Z"), st.just("z"))),
    st.sampled_from(["0001-01-01T00:00:00+00:01", "0001-01-01T00:00:00Z",
                     "9999-12-31T23:59:59.999-00:01", "9999-12-31T23:59:59.999Z",
                     "2026-02-29T00:00:00Z", "2024-02-29T24:00:00Z", "2026-12-31T23:59:60Z",
                     "2026-11-22T06:00:00.123456789Z", "2026-11-22T06:00:00+24:00"]),
)
values: st.SearchStrategy[Any] = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers, texts),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12)
FIELDS = ["timeout", "expires_at", "env", "cwd", "stdin", "ok_codes", "sig", "max_bytes",
          "mode", "sha256", "url", "dest", "type", "v", "extra"]


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, bytes]:
    """(task id, payload) of a task whose other fields are hostile."""
    task_id = f"p-{draw(st.integers(0, 10**9))}"
    task = shell(task_id, ["/bin/echo", draw(texts)], timeout=10)
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        if name == "expires_at":
            task[name] = draw(st.one_of(times, values))
        elif name == "env":
            task[name] = draw(st.dictionaries(texts, st.one_of(texts, values), max_size=3))
        else:
            task[name] = draw(st.one_of(numbers, texts, values))
    shape = draw(st.sampled_from(["plain", "duplicate", "deep", "wide"]))
    body = json.dumps(task, ensure_ascii=draw(st.booleans()))
    try:  # a lone surrogate is only sendable escaped: raw, it is not UTF-8 and has no id
        body.encode("utf-8")
    except UnicodeEncodeError:
        body = json.dumps(task)
    if shape == "duplicate":  # a second `timeout`, and a second `command` that is not argv
        body = body[:-1] + ', "timeout": -1, "command": ["/bin/echo", "dup"]}'
    elif shape == "deep":
        depth = draw(st.sampled_from([10, 500, 900, 3000]))
        body = body[:-1] + ', "extra": ' + "[" * depth + "]" * depth + "}"
    elif shape == "wide":
        body = body[:-1] + ', "extra": [' + ",".join(["0"] * draw(st.sampled_from(
            [1000, 50_000]))) + "]}"
    return task_id, body.encode("utf-8")


def test_every_hostile_task_gets_exactly_one_answer(mosquitto: Mosquitto, observer: Observer,
                                                     tmp_path: Path) -> None:
    agent = AgentProcess(mosquitto.url, "node-p", tmp_path / "a", "--queue-size", "1000").start()
    agent.wait_online(observer)
    sent: list[str] = []
    unique = itertools.count()

    @settings(max_examples=250, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(messages())
    def one(message: tuple[str, bytes]) -> None:
        task_id, payload = message
        task_id = f"{task_id}-{next(unique)}"  # hypothesis replays: never reuse an id
        payload = payload.replace(f'"{message[0]}"'.encode(), f'"{task_id}"'.encode(), 1)
        sent.append(task_id)
        observer.send("node-p", payload)
        final = observer.final(task_id, timeout=30)
        assert final["state"] in FINALS
        if final.get("error"):
            assert final["error"]["code"] in CODES, final
        assert agent.alive(), agent.log()[-3000:]

    one()
    observer.send("node-p", shell("canary", "echo alive"))
    assert observer.final("canary", timeout=30)["stdout"] == "alive\n"
    for task_id in sent:
        answers = [u for u in observer.updates(task_id) if u["state"] in FINALS]
        assert len(answers) == 1, (task_id, answers)
    assert "Traceback" not in agent.log(), agent.log()[-3000:]
    assert agent.terminate() == 0
