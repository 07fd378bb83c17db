"""Targeting by facts: `--where` expressions, MAC addresses as targets, combined with ids
and globs; hostile expressions are clear errors. Unit tests of the rules, then real
agents whose facts differ (each reads its own /sys tree)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgerun.control.errors import BadRequest, UnknownNode
from edgerun.scheduler.fleet.targets import parse_where, parse_wheres, select_nodes
from edgerun.scheduler.service import Service
from edgerun.scheduler.store.records import NodeRow

from .brokers import Mosquitto
from .fleet_kit import AgentSpec, make_sys_root, pool
from .scheduler_kit import Api, running_app

SEEN = "2026-12-01T10:00:00.000Z"


def known(node: str, state: str, facts: dict[str, Any] | None) -> NodeRow:
    return NodeRow(node=node, state=state, first_seen=SEEN, last_seen=SEEN, changed_at=SEEN,
                   agent=None, facts=facts, running=[])


NODES: list[NodeRow] = [
    known("dell-1", "online", {
        "arch": "x86_64", "cpus": 64, "macs": {"eth0": "52:54:00:aa:00:01"},
        "dmi": {"vendor": "Dell Inc.", "product": "PowerEdge R650"},
        "ips": {"eth0": ["10.0.0.5/24"]}}),
    known("hp-1", "offline", {
        "arch": "x86_64", "cpus": 16, "macs": {"eth0": "aa:bb:cc:dd:ee:01",
                                               "eth1": "52:54:00:aa:00:02"},
        "dmi": {"vendor": "HPE"}}),
    known("arm-1", "online", {
        "arch": "aarch64", "cpus": 8, "macs": {}, "dmi": {"vendor": "Ampere"}}),
    known("bare", "online", None),
]


def pick(*wheres: str, patterns: tuple[str, ...] = (), online: bool = False) -> list[str]:
    return select_nodes(list(patterns), NODES, online_only=online,
                        where=parse_wheres(list(wheres)))


def test_equality_globs_numbers_lists_and_nesting() -> None:
    assert pick("arch=x86_64") == ["dell-1", "hp-1"]
    assert pick("arch!=x86_64") == ["arm-1", "bare"]  # a missing fact matches !=
    assert pick("dmi.sys_vendor=Dell*") == ["dell-1"]  # the sysfs name works too
    assert pick("dmi.vendor=dell*") == ["dell-1"]  # case does not matter
    assert pick("cpus>=16") == ["dell-1", "hp-1"]
    assert pick("cpus<16") == ["arm-1"]
    assert pick("cpus=64") == ["dell-1"]
    assert pick("macs=52:54:00:*") == ["dell-1", "hp-1"]  # any element of a map or list
    assert pick("ips=10.0.0.*") == ["dell-1"]
    assert pick("arch=x86_64", "cpus>32") == ["dell-1"]  # every --where must hold
    assert pick("arch=x86_64", online=True) == ["dell-1"]
    assert pick("arch=x86_64", patterns=("hp-*",)) == ["hp-1"]  # filters ids and globs


def test_a_mac_address_resolves_to_its_node() -> None:
    assert pick(patterns=("52:54:00:AA:00:02",)) == ["hp-1"]
    assert pick(patterns=("aa-bb-cc-dd-ee-01",)) == ["hp-1"]
    assert pick(patterns=("52:54:00:aa:00:01", "arm-1")) == ["dell-1", "arm-1"]
    with pytest.raises(UnknownNode, match="no node has reported the MAC address"):
        pick(patterns=("00:11:22:33:44:55",))


@pytest.mark.parametrize("text, problem", [
    ("arch", "no operator"),
    ("", "no operator"),
    ("=x86_64", "fact name"),
    ("cpus>=many", "not a number"),
    ("cpus>", "not a number"),
    ("arch=", "no value"),
    ("a..b=1", "empty part"),
    ("arch=x86_64=y", "another operator"),
    ("cpus>=nan", "not a number"),
    ("a b=c", "fact name"),
    ("x" * 600 + "=1", "limit"),
])
def test_bad_expressions_say_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(BadRequest, match=problem):
        parse_where(text)


def test_bad_where_values_and_no_match() -> None:
    with pytest.raises(BadRequest, match="must be a list"):
        parse_wheres({"arch": "x"})
    with pytest.raises(BadRequest, match="must be a string"):
        parse_wheres([3])
    with pytest.raises(BadRequest, match="limit is 32"):
        parse_wheres(["arch=x"] * 33)
    with pytest.raises(UnknownNode, match="no node has facts matching 'arch=sparc'"):
        pick("arch=sparc")


# --- real agents ---------------------------------------------------------------------------
@pytest.fixture
def fleet(mosquitto: Mosquitto, tmp_path: Path) -> Iterator[tuple[Api, Service]]:
    roots = {
        "tgt-dell": make_sys_root(tmp_path / "r1", vendor="Dell Inc.",
                                  macs={"eth0": "52:54:00:12:34:01"}),
        "tgt-hp": make_sys_root(tmp_path / "r2", vendor="HPE",
                                macs={"eth0": "52:54:00:12:34:02"}),
        "tgt-other": make_sys_root(tmp_path / "r3", vendor="Supermicro",
                                   macs={"eth0": "aa:bb:cc:00:00:03"}),
    }
    with running_app(mosquitto.url, tmp_path) as app:
        api = Api(app.api_url)
        agents = [AgentSpec(node, str(root)) for node, root in roots.items()]
        with pool(mosquitto.url, tmp_path / "agents", agents, api):
            assert app.service is not None
            yield api, app.service


def test_dispatch_by_facts_runs_only_on_matching_agents(fleet: tuple[Api, Service]) -> None:
    api, svc = fleet
    created = svc.dispatch([], False, {"type": "shell", "command": "echo hi"},
                           where=["dmi.sys_vendor=Dell*"])
    assert [t.node for t in created] == ["tgt-dell"]
    api.wait_state(created[0].id, "tgt-dell", "succeeded")
    macs = svc.dispatch(["tgt-*"], False, {"type": "shell", "command": "true"},
                        where=["macs=52:54:00:*"])
    assert sorted(t.node for t in macs) == ["tgt-dell", "tgt-hp"]
    by_mac = svc.dispatch(["aa:bb:cc:00:00:03"], False, {"type": "shell", "command": "true"})
    assert [t.node for t in by_mac] == ["tgt-other"]
    for task in macs + by_mac:
        api.wait_state(task.id, task.node, "succeeded")
    with pytest.raises(BadRequest, match="no operator"):
        svc.dispatch(["tgt-*"], False, {"type": "shell", "command": "true"}, where=["arch"])

