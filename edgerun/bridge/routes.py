"""The route table: MQTT topic templates <-> AMQP exchange and routing-key templates.

Pure, no I/O. A template is a topic (levels split by `/`) or a routing key
(words split by `.`) where a whole level or word may be a named placeholder
such as `{node}`. Both sides of a route carry the same placeholders, so a
value captured on one side fills the other. The MQTT subscription puts `+`
where a placeholder stands and the AMQP binding key puts `*`: one queue and
one subscription per route, whatever the number of nodes.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from edgerun.errors import ConfigError
from edgerun.protocol import (
    BRIDGE_QUEUE_PREFIX, BRIDGE_TASKS_QUEUE, DEFAULT_PREFIX, EVENTS_EXCHANGE, QOS, TASKS_EXCHANGE,
    Channel, is_node_id, key_template,
)
from edgerun.protocol.amqp import EVENT_CHANNELS

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]{0,31})\}")
_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,100}")
# A captured value becomes a topic level and a routing-key word at once.
_BAD_VALUE = re.compile(r"[/.+#\x00*]")
NODE = "node"  # values of this placeholder must be contract node ids


class Direction(enum.StrEnum):
    MQTT_TO_AMQP = "mqtt_to_amqp"
    AMQP_TO_MQTT = "amqp_to_mqtt"


@dataclass(frozen=True)
class Template:
    """A topic or routing-key template: literal parts and `{name}` parts."""

    text: str
    separator: str  # "/" for MQTT topics, "." for routing keys
    parts: tuple[str | None, ...]  # a literal, or None where a placeholder stands
    names: tuple[str, ...]  # placeholder names, in the order they appear

    @classmethod
    def parse(cls, text: str, separator: str, what: str) -> Template:
        if not isinstance(text, str) or not text:
            raise ConfigError(f"{what} must be a non-empty string")
        wildcards = "+#" if separator == "/" else "*#"
        parts: list[str | None] = []
        names: list[str] = []
        for part in text.split(separator):
            found = _PLACEHOLDER.fullmatch(part)
            if found:
                if found.group(1) in names:
                    raise ConfigError(f"{what} {text!r} uses {{{found.group(1)}}} twice")
                names.append(found.group(1))
                parts.append(None)
                continue
            if "{" in part or "}" in part:
                raise ConfigError(f"{what} {text!r}: a placeholder must fill a whole "
                                  f"{'level' if separator == '/' else 'word'}, like {{node}}")
            if any(c in part for c in wildcards) or "\x00" in part:
                raise ConfigError(f"{what} {text!r}: no wildcards ({' '.join(wildcards)}); "
                                  "use a placeholder such as {node}")
            if separator == "/" and part.startswith("$") and not parts:
                raise ConfigError(f"{what} {text!r}: topics starting with $ are the broker's")
            parts.append(part)
        return cls(text, separator, tuple(parts), tuple(names))

    @property
    def pattern(self) -> str:
        """The subscription (`+`) or binding key (`*`) that matches every value."""
        wildcard = "+" if self.separator == "/" else "*"
        return self.separator.join(wildcard if p is None else p for p in self.parts)

    def match(self, concrete: str) -> dict[str, str] | None:
        """The placeholder values if `concrete` has this template's shape, else None."""
        pieces = concrete.split(self.separator)
        if len(pieces) != len(self.parts):
            return None
        values: dict[str, str] = {}
        for part, piece in zip(self.parts, pieces, strict=True):
            if part is None:
                values[self.names[len(values)]] = piece
            elif part != piece:
                return None
        return values

    def render(self, values: Mapping[str, str]) -> str:
        names = iter(self.names)
        return self.separator.join(values[next(names)] if p is None else p for p in self.parts)


def value_problem(name: str, value: str) -> str | None:
    """Why a captured value may not cross the bridge, or None when it may."""
    if not value:
        return f"empty {{{name}}}"
    if name == NODE:
        return None if is_node_id(value) else f"bad node id {value[:140]!r}"
    if _BAD_VALUE.search(value):
        return f"{{{name}}} {value[:140]!r} holds one of / . + # *"
    return None


@dataclass(frozen=True)
class Route:
    name: str
    direction: Direction
    topic: Template
    exchange: str
    routing_key: Template
    queue: str = ""  # amqp_to_mqtt only: the durable queue the route consumes
    qos: int = 1
    retain: bool = False  # amqp_to_mqtt: the MQTT retain flag
    persistent: bool = True  # mqtt_to_amqp: delivery_mode 2
    content_type: str = "application/json"
    exchange_type: str = "topic"

    @property
    def subscription(self) -> str:
        return self.topic.pattern

    @property
    def binding_key(self) -> str:
        return self.routing_key.pattern


@dataclass(frozen=True)
class Translation:
    """Where one message goes: its destination, or why it is dropped."""

    route: Route
    destination: str | None  # a routing key or an MQTT topic
    problem: str | None = None
    reason: str | None = None  # metrics label of a drop: bad_topic or bad_value


@dataclass
class RouteTable:
    routes: tuple[Route, ...]
    _by_queue: dict[str, Route] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_queue = {r.queue: r for r in self.amqp_to_mqtt}

    @property
    def mqtt_to_amqp(self) -> tuple[Route, ...]:
        return tuple(r for r in self.routes if r.direction is Direction.MQTT_TO_AMQP)

    @property
    def amqp_to_mqtt(self) -> tuple[Route, ...]:
        return tuple(r for r in self.routes if r.direction is Direction.AMQP_TO_MQTT)

    def subscriptions(self, qos_cap: int = 1) -> list[tuple[str, int]]:
        """One MQTT subscription per distinct pattern, at the highest QoS asked for it."""
        wanted: dict[str, int] = {}
        for route in self.mqtt_to_amqp:
            wanted[route.subscription] = max(wanted.get(route.subscription, 0),
                                             min(route.qos, qos_cap))
        return list(wanted.items())

    def exchanges(self) -> dict[str, str]:
        """Exchange name -> type, every exchange any route uses."""
        return {r.exchange: r.exchange_type for r in self.routes}

    def route_for_queue(self, queue: str) -> Route | None:
        return self._by_queue.get(queue)

    def from_mqtt(self, topic: str) -> list[Translation]:
        """Each mqtt_to_amqp route whose pattern matches `topic`, with its routing key."""
        out = []
        for route in self.mqtt_to_amqp:
            values = route.topic.match(topic)
            if values is not None:
                out.append(_translate(route, values, route.routing_key))
        return out

    def from_amqp(self, route: Route, routing_key: str) -> Translation:
        values = route.routing_key.match(routing_key)
        if values is None:
            return Translation(route, None, f"routing key {routing_key[:200]!r} does not fit "
                                            f"{route.routing_key.text!r}", "bad_topic")
        return _translate(route, values, route.topic)


def _translate(route: Route, values: Mapping[str, str], target: Template) -> Translation:
    for name, value in values.items():
        problem = value_problem(name, value)
        if problem:
            return Translation(route, None, problem, "bad_value")
    return Translation(route, target.render(values))


def patterns_overlap(a: str, b: str, separator: str = "/") -> bool:
    """Whether two `+` patterns (no `#`) can match the same topic."""
    pa, pb = a.split(separator), b.split(separator)
    return len(pa) == len(pb) and all(x == y or "+" in (x, y) for x, y in zip(pa, pb, strict=True))


def make_route(spec: Mapping[str, object], index: int) -> Route:
    """One route from its TOML table; ConfigError naming the route on any mistake."""
    where = f"route {index + 1}"
    known = {"name", "direction", "topic", "exchange", "routing_key", "queue", "qos", "retain",
             "persistent", "content_type", "exchange_type"}
    for key in spec:
        if key not in known:
            raise ConfigError(f"{where}: unknown key `{key}`")
    for key in ("direction", "topic", "exchange", "routing_key"):
        if key not in spec:
            raise ConfigError(f"{where}: `{key}` is missing")
    try:
        direction = Direction(str(spec["direction"]))
    except ValueError:
        raise ConfigError(f"{where}: `direction` must be mqtt_to_amqp or amqp_to_mqtt, "
                          f"got {spec['direction']!r}") from None
    topic = Template.parse(_text(spec, "topic", where), "/", f"{where}: topic")
    keyt = Template.parse(_text(spec, "routing_key", where), ".", f"{where}: routing_key")
    if set(topic.names) != set(keyt.names):
        missing = sorted(set(topic.names) ^ set(keyt.names))
        raise ConfigError(f"{where}: placeholder {', '.join('{' + m + '}' for m in missing)} "
                          f"must appear in both topic {topic.text!r} and routing_key {keyt.text!r}")
    name = _text(spec, "name", where, default=f"{direction}-{index + 1}")
    exchange = _name(_text(spec, "exchange", where), where, "exchange")
    queue = ""
    if direction is Direction.AMQP_TO_MQTT:
        queue = _name(_text(spec, "queue", where, default=BRIDGE_QUEUE_PREFIX + name), where,
                      "queue")
    elif "queue" in spec:
        raise ConfigError(f"{where}: `queue` is only for amqp_to_mqtt routes")
    qos = spec.get("qos", 1)
    if not isinstance(qos, int) or isinstance(qos, bool) or qos not in (0, 1):
        raise ConfigError(f"{where}: `qos` must be 0 or 1, got {qos!r}")
    exchange_type = _text(spec, "exchange_type", where, default="topic")
    if exchange_type not in ("topic", "direct", "fanout", "headers"):
        raise ConfigError(f"{where}: `exchange_type` must be topic, direct, fanout or headers")
    return Route(name=_name(name, where, "name"), direction=direction, topic=topic,
                 exchange=exchange, routing_key=keyt, queue=queue, qos=qos,
                 retain=_flag(spec, "retain", where, False),
                 persistent=_flag(spec, "persistent", where, True),
                 content_type=_text(spec, "content_type", where, default="application/json"),
                 exchange_type=exchange_type)


def _text(spec: Mapping[str, object], key: str, where: str, default: str | None = None) -> str:
    value = spec.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: `{key}` must be a non-empty string, got {value!r}")
    return value


def _flag(spec: Mapping[str, object], key: str, where: str, default: bool) -> bool:
    value = spec.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: `{key}` must be true or false, got {value!r}")
    return value


def _name(value: str, where: str, what: str) -> str:
    if not _NAME.fullmatch(value):
        raise ConfigError(f"{where}: `{what}` {value!r} must be 1-100 of A-Z a-z 0-9 _ . : -")
    return value


def build_table(specs: Sequence[Mapping[str, object]]) -> RouteTable:
    """Check every route and the table as a whole; ConfigError on the first mistake."""
    routes = [make_route(spec, i) for i, spec in enumerate(specs)]
    if not routes:
        raise ConfigError("no routes: give at least one [[route]] or leave them all out "
                          "for the default routes")
    _check_unique((r.name for r in routes), "route name")
    _check_unique((r.queue for r in routes if r.queue), "queue")
    for inbound in (r for r in routes if r.direction is Direction.AMQP_TO_MQTT):
        for outbound in (r for r in routes if r.direction is Direction.MQTT_TO_AMQP):
            if patterns_overlap(inbound.subscription, outbound.subscription):
                raise ConfigError(
                    f"route {inbound.name!r} publishes on topics that route {outbound.name!r} "
                    "subscribes to: the bridge would forward its own messages back")
    return RouteTable(tuple(routes))


def _check_unique(values: Iterable[str], what: str) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ConfigError(f"two routes use the same {what} {value!r}")
        seen.add(value)


def default_specs(prefix: str = DEFAULT_PREFIX, tasks_exchange: str = TASKS_EXCHANGE,
                  events_exchange: str = EVENTS_EXCHANGE,
                  tasks_queue: str = BRIDGE_TASKS_QUEUE) -> list[dict[str, object]]:
    """The routes of PROTOCOL.md, "AMQP side", from edgerun.protocol's names."""
    specs: list[dict[str, object]] = [{
        "name": "tasks", "direction": "amqp_to_mqtt", "topic": f"{prefix}/nodes/{{node}}/tasks",
        "exchange": tasks_exchange, "routing_key": key_template(Channel.TASKS),
        "queue": tasks_queue, "qos": QOS[Channel.TASKS]}]
    for channel in EVENT_CHANNELS:
        specs.append({
            "name": str(channel), "direction": "mqtt_to_amqp",
            "topic": f"{prefix}/nodes/{{node}}/{channel}", "exchange": events_exchange,
            "routing_key": key_template(channel), "qos": QOS[channel],
            "persistent": channel is not Channel.OUTPUT})
    return specs
