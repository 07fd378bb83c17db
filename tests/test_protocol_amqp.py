"""The contract's AMQP names: the bridge's default routes and the scheduler's bindings are
built from edgerun.protocol, so that what one publishes the other receives."""

from __future__ import annotations

import re

import pytest

from edgerun.bridge.routes import build_table, default_specs
from edgerun.protocol import (
    AUDIT_EXCHANGE, BRIDGE_TASKS_QUEUE, EVENTS_EXCHANGE, SCHEDULER_QUEUE, TASKS_EXCHANGE,
    Channel, Topics, binding, parse_routing_key, routing_key,
)


def topic_match(pattern: str, key: str) -> bool:
    """AMQP topic-exchange matching for `*` (one word), the only wildcard we bind with."""
    regex = r"\.".join("[^.]+" if word == "*" else re.escape(word)
                       for word in pattern.split("."))
    return re.fullmatch(regex, key) is not None


def test_the_names_of_protocol_md() -> None:
    assert (TASKS_EXCHANGE, EVENTS_EXCHANGE, AUDIT_EXCHANGE) == \
        ("edgerun.tasks", "edgerun.events", "edgerun.audit")
    assert (SCHEDULER_QUEUE, BRIDGE_TASKS_QUEUE) == ("edgerun.scheduler", "edgerun.bridge.tasks")
    assert routing_key("rack1-a") == "node.rack1-a"
    assert routing_key("rack1-a", Channel.UPDATES) == "node.rack1-a.updates"
    assert binding(Channel.TASKS) == "node.*" and binding(Channel.STATUS) == "node.*.status"


@pytest.mark.parametrize("key,parsed", [
    ("node.n1", ("n1", Channel.TASKS)), ("node.n1.output", ("n1", Channel.OUTPUT)),
    ("node.n1.tasks", None), ("node.n1.updates.x", None), ("nodes.n1", None),
    ("node.", None), ("node.a b", None), ("node", None), ("", None),
])
def test_routing_keys_parse_strictly(key: str, parsed: tuple[str, Channel] | None) -> None:
    assert parse_routing_key(key) == parsed


def test_a_bad_node_id_makes_no_routing_key() -> None:
    for node in ("a.b", "", "a/b", "#"):
        with pytest.raises(ValueError):
            routing_key(node)


def test_what_the_bridge_publishes_the_scheduler_binds_and_parses() -> None:
    table = build_table(default_specs())
    topics = Topics()
    for channel in (Channel.UPDATES, Channel.OUTPUT, Channel.STATUS):
        [translation] = table.from_mqtt(topics.topic("n-7", channel))
        key = translation.destination
        assert key == routing_key("n-7", channel) and translation.route.exchange == EVENTS_EXCHANGE
        assert topic_match(binding(channel), key)
        assert parse_routing_key(key) == ("n-7", channel)
        assert not topic_match(binding(Channel.TASKS), key)


def test_what_the_scheduler_publishes_the_bridge_takes() -> None:
    table = build_table(default_specs())
    [route] = table.amqp_to_mqtt
    assert route.exchange == TASKS_EXCHANGE and route.queue == BRIDGE_TASKS_QUEUE
    assert topic_match(route.binding_key, routing_key("n-7"))
    assert table.from_amqp(route, routing_key("n-7")).destination == Topics().tasks("n-7")
