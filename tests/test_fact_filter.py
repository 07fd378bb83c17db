"""The node list's fact filter (`GET /v1/nodes?fact=`) speaks `--where`'s language
(fleet/targets.py): dotted paths, globs, = != >= <= > <, list elements, labels and custom
facts. Against a live `edgerun serve` on a private Mosquitto, a real agent with labels
and simulated nodes (retained status messages) with the awkward facts; hostile filters
get a 422 naming `fact`, never a 500. The console's filter uses this one (its live
updates ask the API too), so tests/test_console_browser.py only checks the page."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgerun.scheduler.api import edge
from edgerun.scheduler.api.handlers import FACT_FILTER, fact_filters

from .apikit import FakeFleet, Stack, stack, wait_for
from .scheduler_kit import start_agent

LABELLED = "ff-rack1"  # a real agent: --label rack=r1 --label role=db
SIMS = {
    "ff-r2": {"labels": {"rack": "r2"},
              "custom": {"x": {"y": "z"}, "place": "Zürich", "asset": "AT-0042"}},
    "ff-disks": {"labels": {"rack": "r10"}, "tags": ["gpu", "ssd"],
                 "disks": [{"name": "sda", "model": "Samsung SSD"}], "cpus": 64},
    "ff-bare": {},
}


@pytest.fixture(scope="module")
def s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("factfilter")
    with stack(tmp, node="ff-agent") as st_:
        agent = start_agent(st_.mosquitto.url, LABELLED, tmp, "--label", "rack=r1",
                            "--label", "role=db")
        fleet = FakeFleet(st_.mosquitto.url)
        try:
            for node, facts in SIMS.items():
                fleet.online([node], **facts)
            api = st_.api()

            def ready() -> bool:
                nodes = {n["node"]: n for n in api.get("/nodes")["nodes"]}
                return set(SIMS) | {LABELLED} <= set(nodes) and (
                    nodes[LABELLED]["facts"] or {}).get("labels") == {"rack": "r1",
                                                                      "role": "db"}
            wait_for(ready, 60)
            yield st_
        finally:
            fleet.close()
            agent.kill()


def nodes(s: Stack, *facts: str, token: str | None = None, **more: str) -> Any:
    query = "&".join([f"fact={quote(f, safe='')}" for f in facts]
                     + [f"{k}={quote(v, safe='')}" for k, v in more.items()])
    return s.http("GET", "/v1/nodes?" + query, token or s.viewer)


def ids(s: Stack, *facts: str, **more: str) -> set[str]:
    reply = nodes(s, *facts, **more)
    assert reply.status == 200, reply.body
    assert reply.body["total"] == len(reply.body["nodes"])
    return {n["node"] for n in reply.body["nodes"]}


def refused(s: Stack, *facts: str) -> str:
    reply = nodes(s, *facts)
    assert reply.status == 422, (facts, reply.status, reply.body)
    assert reply.body["code"] == "invalid" and reply.body["field"] == "fact", reply.body
    message: str = reply.body["error"]
    assert "Traceback" not in message and len(message) < 1200
    return message


def test_labels_of_a_real_agent(s: Stack) -> None:
    assert ids(s, "labels.rack=r1") == {LABELLED}
    assert ids(s, "labels.rack=r2") == {"ff-r2"}
    assert ids(s, "labels.rack=R1") == {LABELLED}  # case-insensitive, as --where
    assert ids(s, "labels.rack=r1", "labels.role=db") == {LABELLED}  # all must hold
    assert ids(s, "labels.rack=r1", "labels.role=web") == set()  # 200 and none, not 404
    assert ids(s, "labels.rack=r?") == {LABELLED, "ff-r2"}  # a glob
    assert ids(s, "labels.rack=r*") == {LABELLED, "ff-r2", "ff-disks"}
    assert ids(s, " labels.rack = r1 ") == {LABELLED}  # spaces around the operator
    # with the other filters: a glob over ids, online only, a page
    assert ids(s, "labels.rack=r*", match="ff-r*") == {LABELLED, "ff-r2"}
    assert ids(s, "labels.rack=r*", online="1") == {LABELLED, "ff-r2", "ff-disks"}
    page = nodes(s, "labels.rack=r*", limit="1").body
    assert page["total"] == 3 and len(page["nodes"]) == 1 and page["next"] == "ff-disks"


def test_custom_facts_dotted_paths_numbers_and_lists(s: Stack) -> None:
    assert ids(s, "custom.x.y=z") == {"ff-r2"}
    assert ids(s, "custom.asset=AT-0042") == {"ff-r2"}
    assert ids(s, "cpus>=64") == {"ff-disks"}
    assert ids(s, "cpus>=6.4e1") == {"ff-disks"}
    assert ids(s, "tags=ssd") == {"ff-disks"}  # a list matches if any element does
    assert ids(s, "disks=samsung*") == {"ff-disks"}  # ...and elements' values, as --where
    assert "ff-disks" not in ids(s, "tags!=ssd")


def test_a_path_into_a_list_or_a_missing_key_reaches_nothing(s: Stack) -> None:
    everyone = ids(s)
    # a dotted path does not go through a list: `disks.name` is a missing fact
    assert ids(s, "disks.name=sda") == set()
    assert ids(s, "disks.0.name=sda") == set()
    assert ids(s, "disks.name!=sda") == everyone
    # a missing fact never matches =, <, > and always matches != (as --where)
    assert ids(s, "labels.nope=x") == set()
    assert ids(s, "labels.nope!=x") == everyone
    assert ids(s, "labels.rack.deeper=r1") == set()  # through a string
    assert ids(s, "nosuchfact>=1") == set()
    assert "ff-bare" in ids(s, "labels.rack!=r1") and LABELLED not in ids(s, "labels.rack!=r1")


def test_unicode_values_and_names(s: Stack) -> None:
    assert ids(s, "custom.place=Zürich") == {"ff-r2"}
    assert ids(s, "custom.place=ZÜRICH") == {"ff-r2"}
    assert ids(s, "custom.place=Zü*") == {"ff-r2"}
    assert ids(s, "labels.rack=☃") == set()
    # a fact's name is letters, digits, _ . - only: a clear refusal
    message = refused(s, "läbels.rack=r1")
    assert "fact name" in message and "läbels" in message
    # a value that does not decode (bytes that are not UTF-8): the edge refuses it
    raw = s.http("GET", "/v1/nodes?fact=labels.rack%3D%FF%FE", s.viewer)
    assert raw.status == 422 and raw.body["field"] == "fact"


def test_the_same_answers_as_where(s: Stack) -> None:
    """One language: `fact=` and `where=` (which dispatch uses) choose the same nodes."""
    for expr in ("labels.rack=r1", "labels.rack=r*", "custom.x.y=z", "cpus>=64",
                 "tags=gpu", "labels.nope!=x", "arch=x86_64", "custom.place=zürich"):
        reply = s.http("GET", "/v1/nodes?where=" + quote(expr, safe=""), s.viewer)
        chosen = {n["node"] for n in reply.body["nodes"]} if reply.status == 200 else set()
        assert reply.status in (200, 404), reply.body
        assert ids(s, expr) == chosen, expr


@pytest.mark.parametrize(("expr", "words"), [
    ("labels.rack", "no operator"),
    ("=r1", "fact name"),
    ("labels..rack=r1", "empty part"),
    ("labels.rack=", "no value"),
    ("labels.rack=r1=r2", "another operator"),
    ("labels.rack==r1", "another operator"),
    ("cpus>=many", "not a number"),
    ("cpus>=1e999", "not a number"),
    ("cpus>=nan", "not a number"),
    ("labels.rack=r\x01", "printable"),
    ("labels.rack=r1\tr2", "printable"),
    ("cpus>=1_000", "plain decimal"),
    ("labels.rack=r1\n", "printable"),  # Python's $ takes a last newline, ECMAScript's not
    ("labels.rack=\ufeff", "printable"),  # blank to ECMAScript, not to Python
    ("labels.rack=\x85", "no value"),  # blank to Python (schemathesis found it)
])
def test_malformed_filters_are_a_422_naming_fact(s: Stack, expr: str, words: str) -> None:
    message = refused(s, expr)
    assert words in message, message
    assert "fact filter" in message  # says what was wrong, in the API's terms


def test_huge_and_many_filters(s: Stack) -> None:
    assert "the limit is 512" in refused(s, "labels.rack=" + "r" * 600)
    assert ids(s, "labels.rack=r" + "*" * 499) == {LABELLED, "ff-r2", "ff-disks"}  # 512
    # past the edge's 4096 characters: the edge's own 422
    assert nodes(s, "labels.rack=" + "r" * 5000).body["field"] == "fact"
    assert ids(s, *["labels.rack=r1"] * 32) == {LABELLED}
    assert "the limit is 32" in refused(s, *["labels.rack=r1"] * 33)
    # a glob built to backtrack: fnmatch's translation is linear, the answer comes back
    assert ids(s, "labels.rack=" + "*a" * 200 + "b") == set()


def test_a_viewer_and_the_old_form_still_work(s: Stack) -> None:
    assert ids(s, "arch=x86_64") >= {"ff-r2", "ff-disks", "ff-bare"}
    assert nodes(s, "labels.rack=r1", token=s.operator).status == 200
    assert nodes(s, "labels.rack=r1", token="nope").status == 401


# --- the document's pattern and the handler agree (no server needed) -------------------
@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.from_regex(FACT_FILTER, fullmatch=True))
def test_every_filter_the_document_allows_is_taken(text: str) -> None:
    """What the OpenAPI schema calls valid (schemathesis sends it) is never refused."""
    if len(text) > 512 or "\x00" in text or "\ufffd" in text:
        return
    assert len(fact_filters([text])) == 1


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.text(alphabet=st.sampled_from("ab.=!<>*? \t\n\x01\x85\ufeffü0-9e"), max_size=20))
def test_any_text_is_an_answer(text: str) -> None:
    """Any text: a list of one filter or Invalid naming `fact`, nothing else."""
    try:
        fact_filters([text])
    except edge.Invalid as exc:
        assert exc.field == "fact" and str(exc)
    else:
        assert FACT_FILTER.fullmatch(text)
