"""Which nodes a request means: explicit ids, MAC addresses, globs over the registry,
`--online`, and `--where` expressions over the facts each node reported.

    --where arch=x86_64              a fact equals a value (a glob: 'dmi.vendor=Dell*')
    --where 'cpus>=32'               numeric comparison: = != < <= > >=
    --where 'macs=52:54:00:*'        list (and map) facts match if any element matches
    --where 'dmi.sys_vendor!=QEMU'   dotted paths reach into nested facts

Several `--where` must all hold; they filter the nodes the ids and globs chose
(or every known node when none are named). String matching is a glob, case
insensitive (vendors spell their names in many ways); a fact that is missing
never matches `=`, `<`, `>` and always matches `!=`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Protocol

from edgerun.control.errors import BadRequest, UnknownNode
from edgerun.protocol import JSONObject, is_node_id

GLOB_CHARS = frozenset("*?[")
OPERATORS = ("!=", ">=", "<=", "=", ">", "<")
_EXPR = re.compile(r"^\s*([A-Za-z0-9_][A-Za-z0-9_.-]*)\s*(!=|>=|<=|=|>|<)\s*(.*?)\s*$")
_MAC = re.compile(r"^[0-9A-Fa-f]{2}([:-])[0-9A-Fa-f]{2}(\1[0-9A-Fa-f]{2}){4}$")
MAX_EXPRESSIONS = 32
MAX_EXPRESSION_LEN = 512
# the sysfs file names people know (dmi/id/sys_vendor), mapped to the catalog's keys
DMI_ALIASES = {"sys_vendor": "vendor", "product_name": "product", "product_serial": "serial"}


def is_glob(pattern: str) -> bool:
    return any(c in GLOB_CHARS for c in pattern)


def glob_prefix(pattern: str) -> str:
    """What every id a glob matches starts with: the text before its first wildcard."""
    cut = next((i for i, c in enumerate(pattern) if c in GLOB_CHARS), len(pattern))
    return pattern[:cut]


def is_mac(text: str) -> bool:
    return _MAC.fullmatch(text) is not None


def normal_mac(text: str) -> str:
    return text.lower().replace("-", ":")


@dataclass(frozen=True)
class Where:
    """One parsed `--where` expression: `path op value`."""

    text: str
    path: tuple[str, ...]
    op: str
    value: str
    number: float | None

    def matches(self, facts: Mapping[str, Any] | None) -> bool:
        found = _lookup(facts or {}, self.path)
        values = list(_flatten(found)) if found is not _MISSING else []
        if self.op == "!=":
            return not any(self._equal(v) for v in values)
        if self.op == "=":
            return any(self._equal(v) for v in values)
        test = _COMPARE[self.op]
        assert self.number is not None
        return any(isinstance(v, (int, float)) and not isinstance(v, bool)
                   and test(float(v), self.number) for v in values)

    def _equal(self, value: Any) -> bool:
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            if self.number is not None and float(value) == self.number:
                return True
            text = str(value)
        elif isinstance(value, str):
            text = value
        else:
            return False
        return fnmatchcase(text.lower(), self.value.lower())


_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b, "<": lambda a, b: a < b,
}
_MISSING = object()


def parse_where(text: Any, name: str = "--where") -> Where:
    """One expression; BadRequest naming the problem when it is not one. `name` is what
    the messages call it (the API's node list says "fact filter")."""
    if not isinstance(text, str):
        raise BadRequest(f"a {name} expression must be a string, not {type(text).__name__}")
    if len(text) > MAX_EXPRESSION_LEN:
        raise BadRequest(f"{name} expression is {len(text)} characters; the limit is "
                         f"{MAX_EXPRESSION_LEN}")
    match = _EXPR.match(text)
    if match is None:
        if not any(op in text for op in OPERATORS):
            raise BadRequest(f"bad {name} {text!r}: no operator; write FACT=VALUE, FACT!=VALUE "
                             f"or FACT>=N (also <=, >, <), as in arch=x86_64 or 'cpus>=32'")
        raise BadRequest(f"bad {name} {text!r}: the fact name before the operator must be "
                         f"letters, digits, _ . - (a dotted path such as dmi.vendor)")
    path_text, op, value = match.groups()
    path = tuple(path_text.split("."))
    if any(not part for part in path):
        raise BadRequest(f"bad {name} {text!r}: empty part in the fact path {path_text!r}")
    if path[0] == "dmi" and len(path) == 2:
        path = ("dmi", DMI_ALIASES.get(path[1], path[1]))
    if any(c in value for c in "=<>!") and op in ("=", "!="):
        raise BadRequest(f"bad {name} {text!r}: the value {value!r} holds another operator; "
                         f"one comparison per {name}")
    number = _number(value)
    if op not in ("=", "!="):
        if number is None:
            raise BadRequest(f"bad {name} {text!r}: {op} compares numbers, and {value!r} is "
                             f"not a number")
    elif not value:
        raise BadRequest(f"bad {name} {text!r}: no value after {op}")
    return Where(text, path, op, value, number)


def parse_wheres(items: Any) -> list[Where]:
    if items is None:
        return []
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list):
        raise BadRequest("`where` must be a list of expressions such as \"arch=x86_64\"")
    if len(items) > MAX_EXPRESSIONS:
        raise BadRequest(f"{len(items)} --where expressions; the limit is {MAX_EXPRESSIONS}")
    return [parse_where(item) for item in items]


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None


def _lookup(facts: Any, path: Sequence[str]) -> Any:
    value = facts
    for part in path:
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _flatten(value: Any, depth: int = 0) -> Iterable[Any]:
    """A list matches if any element does; a map (macs: name -> mac) if any value does."""
    if depth > 4:
        return
    if isinstance(value, Mapping):
        for item in value.values():
            yield from _flatten(item, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _flatten(item, depth + 1)
    else:
        yield value


class Known(Protocol):
    """What choosing targets reads of a node (the store's NodeRow has it)."""

    @property
    def node(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def facts(self) -> JSONObject | None: ...


@dataclass(frozen=True)
class Bare:
    node: str
    state: str
    facts: JSONObject | None = None


def resolve_targets(patterns: Sequence[str], nodes: Mapping[str, str], *,
                    online_only: bool = False) -> list[str]:
    """The node ids meant, from a node -> state map (no facts, no --where)."""
    return select_nodes(patterns, [Bare(n, s) for n, s in nodes.items()],
                        online_only=online_only)


def select_nodes(patterns: Sequence[str], nodes: Sequence[Known], *,
                 online_only: bool = False, where: Sequence[Where] = ()) -> list[str]:
    """The node ids meant, in order, without repeats.

    `nodes` are the registry's records (`node`, `state`, `facts`). An explicit id
    must be known (a task for a node that never reported would wait for nothing);
    a MAC address that is not a node id means the node that reported it; a glob
    must match at least one node; `online_only` keeps online nodes only;
    `where` keeps nodes whose facts satisfy every expression. With no patterns,
    `--online` or `--where` alone choose among every known node.
    """
    if not patterns and not online_only and not where:
        raise BadRequest("no target: name node ids, a glob such as 'rack1-*', --where "
                         "FACT=VALUE, or --online")
    state = {n.node: n.state for n in nodes}
    facts = {n.node: n.facts for n in nodes}
    chosen: list[str] = []
    if not patterns:
        chosen = sorted(state)
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise BadRequest(f"{pattern!r} is not a node id, MAC address or glob")
        if is_glob(pattern):
            matched = sorted(n for n in state if fnmatchcase(n, pattern))
            if not matched:
                raise UnknownNode(f"no known node matches {pattern!r} (see `edgerun nodes`)")
            chosen.extend(matched)
        elif pattern in state:
            chosen.append(pattern)
        elif is_mac(pattern):
            chosen.append(_by_mac(pattern, facts))
        elif not is_node_id(pattern):
            raise BadRequest(f"{pattern!r} is not a node id (1-128 of A-Z a-z 0-9 _ : -), "
                             f"a MAC address nor a glob")
        else:
            raise UnknownNode(f"unknown node {pattern!r}: it has never reported to this "
                              f"scheduler (see `edgerun nodes`)")
    unique = list(dict.fromkeys(chosen))
    if online_only:
        unique = [n for n in unique if state[n] == "online"]
        if not unique:
            raise UnknownNode("no online node among those named (see `edgerun nodes`)"
                              if patterns else "no node is online (see `edgerun nodes`)")
    if where:
        unique = [n for n in unique if all(w.matches(facts[n]) for w in where)]
        if not unique:
            which = " and ".join(repr(w.text) for w in where)
            raise UnknownNode(f"no {'online ' if online_only else ''}node "
                              f"{'among those named ' if patterns else ''}has facts matching "
                              f"{which} (see `edgerun nodes --json`)")
    return unique


def _by_mac(mac: str, facts: Mapping[str, Any]) -> str:
    wanted = normal_mac(mac)
    owners = sorted(node for node, f in facts.items()
                    if isinstance(f, Mapping) and any(
                        isinstance(m, str) and normal_mac(m) == wanted
                        for m in _flatten(f.get("macs"))))
    if not owners:
        raise UnknownNode(f"no node has reported the MAC address {wanted} (see `edgerun nodes "
                          f"--json`)")
    if len(owners) > 1:
        raise BadRequest(f"the MAC address {wanted} is reported by several nodes "
                         f"({', '.join(owners)}); name the node")
    return owners[0]
