"""The bridge's pure parts: templates, the route table, confirm bookkeeping."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgerun.amqpconfirms import ConfirmTracker
from edgerun.bridge.routes import (
    Direction,
    Template,
    build_table,
    default_specs,
    patterns_overlap,
    value_problem,
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
