"""Which nodes a request means: explicit ids, globs over the registry, `--online`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase

from edgerun.protocol import is_node_id

from .errors import BadRequest, UnknownNode

GLOB_CHARS = frozenset("*?[")


def is_glob(pattern: str) -> bool:
    return any(c in GLOB_CHARS for c in pattern)


def resolve_targets(patterns: Sequence[str], nodes: Mapping[str, str], *,
                    online_only: bool = False) -> list[str]:
    """The node ids meant, in order, without repeats.

    `nodes` maps every known node to its state ("online"/"offline"). An
    explicit id must be known (a task for a node that never reported would
    wait for nothing); a glob must match at least one node; `online_only`
    keeps online nodes only, and on its own means every online node.
    """
    if not patterns and not online_only:
        raise BadRequest("no target: name node ids, a glob such as 'rack1-*', or --online")
    chosen: list[str] = []
    if not patterns:
        chosen = sorted(n for n, state in nodes.items() if state == "online")
        if not chosen:
            raise UnknownNode("no node is online (see `edgerun nodes`)")
        return chosen
    for pattern in patterns:
        if is_glob(pattern):
            matched = sorted(n for n in nodes if fnmatchcase(n, pattern))
            if online_only:
                matched = [n for n in matched if nodes[n] == "online"]
            if not matched:
                which = "online node" if online_only else "known node"
                raise UnknownNode(f"no {which} matches {pattern!r} (see `edgerun nodes`)")
            chosen.extend(matched)
            continue
        if not is_node_id(pattern):
            raise BadRequest(f"{pattern!r} is not a node id (1-128 of A-Z a-z 0-9 _ : -) "
                             f"nor a glob")
        if pattern not in nodes:
            raise UnknownNode(f"unknown node {pattern!r}: it has never reported to this "
                              f"scheduler (see `edgerun nodes`)")
        if online_only and nodes[pattern] != "online":
            continue
        chosen.append(pattern)
    unique = list(dict.fromkeys(chosen))
    if not unique:
        raise UnknownNode("none of the named nodes is online (see `edgerun nodes`)")
    return unique
