"""The bridge's pure parts: templates, the route table, confirm bookkeeping."""

from __future__ import annotations

import struct
from typing import Any

import pika
import pika.frame
import pytest
from hypothesis import assume, given, settings
from pika import frame, spec
from hypothesis import strategies as st

from edgerun import amqpwire
from edgerun.amqpwire import publish_frames
from edgerun.amqpconfirms import ConfirmTracker
from edgerun.bridge.routes import (
    Direction, Template, build_table, default_specs, patterns_overlap, value_problem,
)
from edgerun.errors import ConfigError

NODE_IDS = st.text(alphabet="ABCxyz019_:-", min_size=1, max_size=128)


def test_default_routes_are_the_contract() -> None:
    table = build_table(default_specs())
    assert [(r.name, r.direction, r.subscription, r.exchange, r.binding_key)
            for r in table.routes] == [
        ("tasks", Direction.AMQP_TO_MQTT, "edgerun/nodes/+/tasks", "edgerun.tasks", "node.*"),
        ("updates", Direction.MQTT_TO_AMQP, "edgerun/nodes/+/updates", "edgerun.events",
         "node.*.updates"),
        ("output", Direction.MQTT_TO_AMQP, "edgerun/nodes/+/output", "edgerun.events",
         "node.*.output"),
        ("status", Direction.MQTT_TO_AMQP, "edgerun/nodes/+/status", "edgerun.events",
         "node.*.status"),
    ]
    persistent = {r.name: r.persistent for r in table.mqtt_to_amqp}
    assert persistent == {"updates": True, "output": False, "status": True}
    assert {r.content_type for r in table.routes} == {"application/json"}
    assert table.subscriptions() == [("edgerun/nodes/+/updates", 1),
                                     ("edgerun/nodes/+/output", 0),
                                     ("edgerun/nodes/+/status", 1)]
    assert table.exchanges() == {"edgerun.tasks": "topic", "edgerun.events": "topic"}
    assert table.amqp_to_mqtt[0].queue == "edgerun.bridge.tasks"


def test_topic_to_key_and_back() -> None:
    table = build_table(default_specs("lab"))
    [found] = table.from_mqtt("lab/nodes/n-1:a/status")
    assert found.route.name == "status" and found.destination == "node.n-1:a.status"
    tasks = table.amqp_to_mqtt[0]
    assert table.from_amqp(tasks, "node.web_7").destination == "lab/nodes/web_7/tasks"
    assert table.from_mqtt("edgerun/nodes/n1/status") == []  # another prefix: no route
    assert table.from_mqtt("lab/nodes/n1/status/extra") == []


@pytest.mark.parametrize("topic", ["edgerun/nodes/bad.id/updates", "edgerun/nodes//updates",
                                   "edgerun/nodes/sp ace/updates", "edgerun/nodes/" + "x" * 129
                                   + "/updates"])
def test_a_topic_whose_node_id_breaks_the_contract_is_dropped(topic: str) -> None:
    [found] = build_table(default_specs()).from_mqtt(topic)
    assert found.destination is None and found.reason == "bad_value"
    assert found.problem


@pytest.mark.parametrize("key,reason", [("node.a.b", "bad_topic"), ("node", "bad_topic"),
                                        ("job.n1", "bad_topic"), ("node.a+b", "bad_value"),
                                        ("node.#", "bad_value"), ("node.", "bad_value")])
def test_a_routing_key_that_does_not_fit_is_dropped(key: str, reason: str) -> None:
    table = build_table(default_specs())
    found = table.from_amqp(table.amqp_to_mqtt[0], key)
    assert found.destination is None and found.reason == reason


@given(NODE_IDS)
def test_any_contract_node_id_round_trips(node: str) -> None:
    table = build_table(default_specs())
    [up] = table.from_mqtt(f"edgerun/nodes/{node}/updates")
    assert up.destination == f"node.{node}.updates"
    down = table.from_amqp(table.amqp_to_mqtt[0], f"node.{node}")
    assert down.destination == f"edgerun/nodes/{node}/tasks"


def test_other_placeholders_and_exchanges() -> None:
    table = build_table([
        {"name": "metrics", "direction": "mqtt_to_amqp", "topic": "site/{site}/{node}/metrics",
         "exchange": "telemetry", "routing_key": "{site}.{node}", "persistent": False},
        {"name": "alerts", "direction": "mqtt_to_amqp", "topic": "site/{site}/{node}/alert",
         "exchange": "ops", "routing_key": "alert.{node}.{site}", "exchange_type": "direct"},
        {"name": "cmd", "direction": "amqp_to_mqtt", "topic": "cmd/{node}",
         "exchange": "commands", "routing_key": "to.{node}", "queue": "bridge.cmd", "qos": 0,
         "retain": True},
    ])
    [metric] = table.from_mqtt("site/ams/n7/metrics")
    assert (metric.route.exchange, metric.destination) == ("telemetry", "ams.n7")
    [alert] = table.from_mqtt("site/ams/n7/alert")
    assert (alert.route.exchange, alert.destination) == ("ops", "alert.n7.ams")
    [bad] = table.from_mqtt("site/a.b/n7/alert")  # a dot would split the routing-key word
    assert bad.destination is None and bad.reason == "bad_value"
    cmd = table.route_for_queue("bridge.cmd")
    assert cmd is not None and cmd.binding_key == "to.*" and cmd.retain and cmd.qos == 0
    assert table.exchanges() == {"telemetry": "topic", "ops": "direct", "commands": "topic"}


def test_a_message_matching_two_routes_goes_to_both() -> None:
    table = build_table([
        {"name": "a", "direction": "mqtt_to_amqp", "topic": "x/{node}/up",
         "exchange": "e1", "routing_key": "{node}"},
        {"name": "b", "direction": "mqtt_to_amqp", "topic": "x/{node}/up",
         "exchange": "e2", "routing_key": "copy.{node}"},
    ])
    assert [(t.route.name, t.destination) for t in table.from_mqtt("x/n/up")] == [
        ("a", "n"), ("b", "copy.n")]
    assert table.subscriptions() == [("x/+/up", 1)]


@pytest.mark.parametrize("spec,message", [
    ({"topic": "edgerun/nodes/{node}/updates", "routing_key": "node.updates"},
     "{node} must appear in both"),
    ({"topic": "edgerun/nodes/updates", "routing_key": "node.{node}"}, "must appear in both"),
    ({"topic": "edgerun/nodes/+/updates", "routing_key": "node.updates"}, "no wildcards"),
    ({"topic": "edgerun/#", "routing_key": "all"}, "no wildcards"),
    ({"topic": "edgerun/{node}", "routing_key": "node.*"}, "no wildcards"),
    ({"topic": "edgerun/n{node}", "routing_key": "n.{node}"}, "whole level"),
    ({"topic": "edgerun/{node}/{node}", "routing_key": "{node}"}, "twice"),
    ({"topic": "$SYS/{node}", "routing_key": "{node}"}, "broker's"),
    ({"topic": "", "routing_key": "{node}"}, "non-empty"),
    ({"direction": "sideways"}, "direction"),
    ({"exchange": "bad exchange"}, "exchange"),
    ({"qos": 2}, "qos"),
    ({"qos": True}, "qos"),
    ({"persistent": "yes"}, "persistent"),
    ({"queue": "q"}, "only for amqp_to_mqtt"),
    ({"colour": "blue"}, "unknown key `colour`"),
    ({"exchange_type": "x-delayed"}, "exchange_type"),
])
def test_route_mistakes_are_config_errors(spec: dict[str, object], message: str) -> None:
    route = {"direction": "mqtt_to_amqp", "topic": "a/{node}", "exchange": "e",
             "routing_key": "k.{node}", **spec}
    with pytest.raises(ConfigError, match="route 1") as err:
        build_table([route])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_table_mistakes_are_config_errors() -> None:
    up = {"direction": "mqtt_to_amqp", "topic": "a/{node}/up", "exchange": "e",
          "routing_key": "{node}", "name": "r"}
    with pytest.raises(ConfigError, match="same route name 'r'"):
        build_table([up, dict(up)])
    with pytest.raises(ConfigError, match="no routes"):
        build_table([])
    loop = {"direction": "amqp_to_mqtt", "topic": "a/{node}/up", "exchange": "e",
            "routing_key": "x.{node}", "name": "back"}
    with pytest.raises(ConfigError, match="forward its own messages"):
        build_table([up, loop])
    down = {"direction": "amqp_to_mqtt", "topic": "a/{node}/down", "exchange": "e",
            "routing_key": "d.{node}", "queue": "q"}
    with pytest.raises(ConfigError, match="same queue 'q'"):
        build_table([down, {**down, "name": "other", "topic": "b/{node}"}])


def test_template_pieces() -> None:
    key = Template.parse("node.{node}.{kind}", ".", "key")
    assert key.pattern == "node.*.*" and key.names == ("node", "kind")
    assert key.match("node.a.b") == {"node": "a", "kind": "b"}
    assert key.match("node.a") is None and key.match("job.a.b") is None
    assert key.render({"node": "n", "kind": "k"}) == "node.n.k"
    assert patterns_overlap("a/+/b", "a/x/+") and not patterns_overlap("a/+/b", "a/+/c")
    assert not patterns_overlap("a/+", "a/+/b")
    assert value_problem("node", "ok-1") is None and value_problem("node", "a.b")
    assert value_problem("site", "a/b") and value_problem("site", "") and \
        value_problem("site", "ams") is None


def test_confirms_single_multiple_and_out_of_order() -> None:
    tracker: ConfirmTracker[str] = ConfirmTracker()
    for tag in range(1, 8):
        tracker.add(tag, f"m{tag}")
    assert tracker.settle(3, multiple=False) == ["m3"]
    assert tracker.settle(3, multiple=False) == []  # never twice
    assert tracker.settle(5, multiple=True) == ["m1", "m2", "m4", "m5"]
    assert len(tracker) == 2
    assert tracker.settle(7, multiple=False) == ["m7"]
    assert tracker.reset() == ["m6"] and len(tracker) == 0
    tracker.add(1, "again")  # a new channel numbers from 1
    with pytest.raises(ValueError):
        tracker.add(1, "twice")


@given(st.lists(st.tuples(st.integers(1, 60), st.booleans()), max_size=40))
def test_confirms_settle_each_publish_at_most_once(answers: list[tuple[int, bool]]) -> None:
    tracker: ConfirmTracker[int] = ConfirmTracker()
    for tag in range(1, 51):
        tracker.add(tag, tag)
    settled: list[int] = []
    for tag, multiple in answers:
        got = tracker.settle(tag, multiple)
        assert got == sorted(got) and all(t <= tag for t in got)
        settled += got
    rest = tracker.reset()
    assert sorted(settled + rest) == list(range(1, 51))


# --- the wire form of a publish: the link writes basic.publish frames itself --------------
SHORT = st.text(max_size=60)
PROPERTIES = st.builds(pika.BasicProperties, content_type=st.none() | st.just("application/json"),
                       delivery_mode=st.none() | st.sampled_from([1, 2]),
                       headers=st.none() | st.dictionaries(st.text(max_size=8),
                                                           st.integers(0, 1000), max_size=3),
                       message_id=st.none() | SHORT)


@given(channel=st.integers(1, 65535), exchange=SHORT, key=SHORT,
       body=st.binary(max_size=3000) | st.builds(bytes, st.integers(0, 300_000)),
       properties=PROPERTIES,
       body_max=st.integers(1, 1024) | st.just(131072 - 8))
@settings(deadline=None)  # pika's own marshalling of thousands of frames is the slow side
def test_publish_frames_are_what_pika_marshals(channel: int, exchange: str, key: str,
                                               body: bytes, properties: Any,
                                               body_max: int) -> None:
    assume(len(body) // body_max <= 5000)  # 300 KB in 1-byte frames says nothing more
    want = [frame.Method(channel, spec.Basic.Publish(exchange=exchange, routing_key=key))
            .marshal(), frame.Header(channel, len(body), properties).marshal()]
    want += [frame.Body(channel, body[at:at + body_max]).marshal()
             for at in range(0, len(body), body_max)]
    pieces, count = publish_frames(channel, exchange, key, body,
                                   b"".join(properties.encode()), body_max)
    assert b"".join(pieces) == b"".join(want)
    assert count == len(want)


def test_a_routing_key_longer_than_a_short_string_is_refused_not_truncated() -> None:
    with pytest.raises(ValueError, match="short strings"):
        publish_frames(1, "x", "é" * 128, b"body", b"", 1000)  # 256 bytes in UTF-8


def _deliver_frames(channel: int, tag: str, delivery: int, key: bytes, body: bytes,
                    body_max: int) -> bytes:
    """A basic.deliver as RabbitMQ writes it (the routing key as raw bytes)."""
    raw = tag.encode()
    method = (struct.pack(">I", 0x003C003C) + bytes((len(raw),)) + raw
              + struct.pack(">QB", delivery, 0) + b"\x02ex" + bytes((len(key),)) + key)
    out = struct.pack(">BHI", 1, channel, len(method)) + method + b"\xce"
    out += frame.Header(channel, len(body),
                        pika.BasicProperties(content_type="application/json")).marshal()
    for at in range(0, len(body), body_max):
        out += frame.Body(channel, body[at:at + body_max]).marshal()
    return out


class _Reader(amqpwire.Connection):  # type: ignore[misc]
    def __init__(self) -> None:  # no pika set-up: only what _deliver touches
        self.bytes_received = self.frames_received = 0


@given(tag=st.text(min_size=1, max_size=40), delivery=st.integers(1, 2**63),
       key=st.text(max_size=60), body=st.binary(max_size=600), body_max=st.integers(1, 200))
def test_a_delivery_decoded_by_the_connection_is_what_pika_decodes(
        tag: str, delivery: int, key: str, body: bytes, body_max: int) -> None:
    data = _deliver_frames(7, tag, delivery, key.encode(), body, body_max)
    got: list[tuple[int, str, int, str, bytes]] = []
    reader = _Reader()
    method_end = 8 + int.from_bytes(data[3:7], "big")
    after = reader._deliver(data, 0, method_end, len(data),
                            lambda *args: got.append(args) or True)
    assert after == len(data) and reader.bytes_received == len(data)
    decoded = pika.frame.decode_frame(data[:method_end])[1].method
    assert got == [(7, decoded.consumer_tag, decoded.delivery_tag, decoded.routing_key, body)]


def test_a_delivery_the_connection_cannot_take_whole_goes_to_pika() -> None:
    data = _deliver_frames(3, "ctag", 5, b"node.n1", b"x" * 500, 100)
    method_end = 8 + int.from_bytes(data[3:7], "big")
    reader = _Reader()

    def never(*_args: object) -> bool:
        raise AssertionError("handed over")

    for cut in (method_end, method_end + 10, len(data) - 1):  # content not all read yet
        assert reader._deliver(data[:cut], 0, method_end, cut, never) == 0
    bad_key = _deliver_frames(3, "ctag", 5, b"node.\xff", b"body", 100)  # not UTF-8
    end = 8 + int.from_bytes(bad_key[3:7], "big")
    assert reader._deliver(bad_key, 0, end, len(bad_key), never) == 0
    other = data[:method_end] + frame.Heartbeat().marshal() + data[method_end:]
    assert reader._deliver(other, 0, method_end, len(other), never) == 0  # channel 0 between
    assert reader._deliver(data, 0, method_end, len(data), lambda *_: False) == 0  # refused
    assert reader.bytes_received == 0
