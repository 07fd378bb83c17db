"""The pure protocol core: parsing, validation codes, canonical JSON, topics, states."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, UTC
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgerun.protocol import (
    AGENT_STATES, FINAL_STATES, TRANSITIONS, Cancel, Channel, DownloadTask, ErrorCode,
    ProtocolError, ShellTask, State, Status, Topics, Update, can_transition, canonical_json,
    decode, decode_bounded, encode, format_time, is_node_id, is_task_id, last_will,
    normalise_node_id, parse_command, parse_message, parse_time, rejected, signing_bytes,
)


def task(**fields: Any) -> dict[str, Any]:
    return {"v": 1, "kind": "task", "id": "t-1", "type": "shell", "command": "true", **fields}


def download(**fields: Any) -> dict[str, Any]:
    return {"v": 1, "kind": "task", "id": "d-1", "type": "download",
            "url": "https://example.org/f", "dest": "/tmp/f", **fields}


def parse(obj: Any) -> Any:
    return parse_command(decode(json.dumps(obj).encode()))


def code_of(payload: bytes | dict[str, Any], max_bytes: int = 256 * 1024) -> tuple[str, Any]:
    raw = json.dumps(payload).encode() if isinstance(payload, dict) else payload
    with pytest.raises(ProtocolError) as info:
        parse_command(decode_bounded(raw, max_bytes))
    return str(info.value.code), info.value.task_id


def test_valid_shell_task_round_trips() -> None:
    expires = datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    original = ShellTask(id="a.b:c-1", command=("ls", "-l"), env={"A": "1"}, cwd="/tmp",
                         stdin="in", ok_codes=(0, 3), timeout=5.5, expires_at=expires)
    assert parse_command(decode(encode(original))) == original


def test_valid_download_task_round_trips() -> None:
    original = DownloadTask(id="d", url="http://h/x", dest="/opt/x", sha256="ab" * 32,
                            mode=0o755, max_bytes=10)
    parsed = parse_command(decode(encode(original)))
    assert parsed == original and parsed.to_dict()["mode"] == "0755"


def test_defaults_and_unknown_fields_ignored() -> None:
    parsed = parse(task(future_field={"x": 1}))
    assert isinstance(parsed, ShellTask)
    assert parsed.timeout == 3600 and parsed.ok_codes == (0,) and parsed.env == {}


def test_cwd_may_be_the_root_but_dest_may_not() -> None:
    assert parse(task(cwd="/")).cwd == "/"
    assert code_of(download(dest="/"))[0] == "bad_message"


def test_cancel() -> None:
    assert parse({"v": 1, "kind": "cancel", "id": "x"}) == Cancel("x")


@pytest.mark.parametrize("payload, code, has_id", [
    (b"not json", "bad_message", False),
    (b"\xff\xfe\x00garbage", "bad_message", False),
    (b"[1, 2]", "bad_message", False),
    (b'"just a string"', "bad_message", False),
    (b"{" * 100_000, "bad_message", False),
    (b'{"v": 1, "kind": "task", "id": "n", "timeout": NaN}', "bad_message", False),
    ({"kind": "task", "id": "t", "type": "shell", "command": "x"}, "bad_message", True),
    (task(v=2), "bad_message", True),
    (task(v=True), "bad_message", True),
    (task(kind="reboot"), "bad_message", True),
    (task(id=None), "bad_message", False),
    (task(id="has/slash"), "bad_message", False),
    (task(id="x" * 129), "bad_message", False),
    (task(id=7), "bad_message", False),
    (task(type="reboot"), "unsupported_type", True),
    (task(type=None), "unsupported_type", True),
    (task(command=5), "bad_message", True),
    (task(command=""), "bad_message", True),
    (task(command="a\x00b"), "bad_message", True),
    (task(command=[]), "bad_message", True),
    (task(command=["", "x"]), "bad_message", True),
    (task(command=["ls", 3]), "bad_message", True),
    (task(env={"A": 1}), "bad_message", True),
    (task(env={"A=B": "x"}), "bad_message", True),
    (task(env=["A"]), "bad_message", True),
    (task(cwd="relative/dir"), "bad_message", True),
    (task(cwd="/a/../b"), "bad_message", True),
    (task(cwd=""), "bad_message", True),
    (task(stdin=3), "bad_message", True),
    (task(ok_codes=0), "bad_message", True),
    (task(ok_codes=[]), "bad_message", True),
    (task(ok_codes=[True]), "bad_message", True),
    (task(timeout=0), "bad_message", True),
    (task(timeout=-1), "bad_message", True),
    (task(timeout="10"), "bad_message", True),
    (task(timeout=True), "bad_message", True),
    (b'{"v":1,"kind":"task","id":"t","type":"shell","command":"x","timeout":1e400}',
     "bad_message", True),
    (task(expires_at="tomorrow"), "bad_message", True),
    (task(expires_at="2030-01-01T00:00:00"), "bad_message", True),
    (task(sig=5), "bad_signature", True),
    (download(dest="relative/file"), "bad_message", True),
    (download(dest="/a/./b"), "bad_message", True),
    (download(dest="/"), "bad_message", True),
    (download(dest=None), "bad_message", True),
    (download(url="ftp://example.org/f"), "bad_message", True),
    (download(url="file:///etc/passwd"), "bad_message", True),
    (download(url="http://"), "bad_message", True),
    (download(url="http://h:99999/x"), "bad_message", True),
    (download(url="http://h/a b"), "bad_message", True),
    (download(url=5), "bad_message", True),
    (download(sha256="zz" * 32), "bad_message", True),
    (download(sha256="ab"), "bad_message", True),
    (download(mode="999"), "bad_message", True),
    (download(mode=755), "bad_message", True),
    (download(max_bytes=0), "bad_message", True),
    (download(max_bytes=1.5), "bad_message", True),
])
def test_bad_input_gets_the_contract_error_code(payload: Any, code: str, has_id: bool) -> None:
    got_code, task_id = code_of(payload)
    assert got_code == code
    assert (task_id is not None) == has_id


def test_oversized_message_is_too_large_and_keeps_its_id() -> None:
    big = task(command="echo " + "x" * 300_000)
    assert code_of(big) == ("too_large", "t-1")
    assert code_of(b"x" * 300_000)[0] == "too_large"
    assert code_of(big, max_bytes=1024)[0] == "too_large"


def test_time_format_and_parse() -> None:
    moment = datetime(2026, 11, 22, 6, 0, 0, 123456, tzinfo=UTC)
    assert format_time(moment) == "2026-11-22T06:00:00.123Z"
    assert parse_time("2026-11-22T06:00:00.123Z") == moment.replace(microsecond=123000)
    assert parse_time("2026-11-22T08:00:00+02:00") == moment.replace(microsecond=0)
    for bad in ("2026-11-22", "yesterday", "2026-11-22T06:00:00"):
        with pytest.raises(ValueError):
            parse_time(bad)


def test_ids_and_normalisation() -> None:
    assert is_node_id("rack1-node_2:a") and not is_node_id("a.b") and not is_node_id("")
    assert not is_node_id("a b") and not is_node_id("x" * 129) and not is_node_id("a+")
    assert is_task_id("a.b") and not is_task_id("a/b") and not is_task_id("a\n")
    assert normalise_node_id("52:54:00:AB:cd:EF") == "52:54:00:ab:cd:ef"
    assert normalise_node_id("My Host.example.COM") == "myhostexamplecom"
    assert normalise_node_id("...") == ""


def test_canonical_json_and_signing_bytes() -> None:
    obj = {"b": 1, "a": "é", "sig": "zzz"}
    assert canonical_json(obj) == '{"a":"é","b":1,"sig":"zzz"}'.encode()
    assert signing_bytes(obj) == '{"a":"é","b":1}'.encode()


def test_topics() -> None:
    topics = Topics("edgerun")
    assert topics.tasks("n1") == "edgerun/nodes/n1/tasks"
    assert topics.wildcard(Channel.STATUS) == "edgerun/nodes/+/status"
    assert topics.parse("edgerun/nodes/n1/updates") == ("n1", Channel.UPDATES)
    assert topics.parse("edgerun/nodes/n.1/updates") is None
    assert topics.parse("other/nodes/n1/updates") is None
    assert topics.parse("edgerun/nodes/n1/other") is None
    with pytest.raises(ValueError):
        Topics("a/b")
    with pytest.raises(ValueError):
        topics.tasks("bad node")


def test_state_table() -> None:
    assert set(TRANSITIONS) == set(State) | {None}
    for final in FINAL_STATES - {State.LOST}:
        assert TRANSITIONS[final] == frozenset()
    assert can_transition(State.LOST, State.SUCCEEDED)
    assert not can_transition(State.SUCCEEDED, State.RUNNING)
    assert not can_transition(State.RUNNING, State.ACCEPTED)
    assert can_transition(State.DISPATCHED, State.SUCCEEDED)  # skipped states are fine
    assert not can_transition(State.RUNNING, State.REJECTED)
    assert State.QUEUED not in AGENT_STATES and State.LOST not in AGENT_STATES


def test_update_status_output_parse() -> None:
    update = rejected("n1", None, ErrorCode.BUSY, "full")
    parsed = parse_message(encode(update))
    assert isinstance(parsed, Update) and parsed.error and parsed.error.code == "busy"
    assert parse_message(encode(last_will("n1"))) == Status("n1", "offline")
    with pytest.raises(ProtocolError):
        parse_message(b'{"v":1,"kind":"update","id":null,"node":"n","state":"running","at":"x"}')
    with pytest.raises(ProtocolError):
        parse_message(b'{"v":1,"kind":"output","id":"t","node":"n","stream":"x","seq":0,"data":""}')


def test_expiry_is_kept_for_the_agent_to_check() -> None:
    past = format_time(datetime.now(UTC) - timedelta(minutes=1))
    parsed = parse(task(expires_at=past))
    assert parsed.expires_at < datetime.now(UTC)


# --- property-based: every input is accepted or rejected with a contract code -------------

CODES = {str(c) for c in ErrorCode}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12)
field_values = {
    "v": st.just(1) | json_values, "kind": st.sampled_from(["task", "cancel"]) | json_values,
    "id": st.from_regex(r"[a-z0-9.]{1,8}", fullmatch=True) | json_values,
    "type": st.sampled_from(["shell", "download"]) | json_values,
    "command": st.text() | st.lists(st.text(), max_size=3) | json_values,
    "url": st.sampled_from(["http://h/x", "https://h/y", "ftp://h"]) | json_values,
    "dest": st.sampled_from(["/tmp/x", "rel", "/a/../b"]) | json_values,
    "timeout": st.floats() | json_values, "env": json_values, "cwd": json_values,
    "ok_codes": json_values, "sha256": json_values, "mode": json_values,
    "max_bytes": json_values, "expires_at": json_values, "stdin": json_values,
}
messages = st.fixed_dictionaries({}, optional=field_values)


@settings(max_examples=600, deadline=None)
@given(messages)
def test_any_object_is_accepted_or_rejected_with_a_code(obj: dict[str, Any]) -> None:
    try:
        raw = json.dumps(obj).encode()
    except ValueError:
        return
    try:
        parsed = parse_command(decode_bounded(raw))
    except ProtocolError as exc:
        assert str(exc.code) in CODES and exc.message
        return
    assert isinstance(parsed, (ShellTask, DownloadTask, Cancel))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_any_bytes_are_accepted_or_rejected_with_a_code(raw: bytes) -> None:
    try:
        parse_message(raw)
    except ProtocolError as exc:
        assert str(exc.code) in CODES
