"""The /v1 API over real HTTP: every status code, roles, strict edges, paging, prefixes, audit,
tokens and their file, TLS and the refusal to serve plain HTTP beyond loopback."""

from __future__ import annotations

import json
import os
import ssl
import stat
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgerun.errors import ConfigError
from edgerun.scheduler.api.auth import admin_token_file
from edgerun.scheduler.api.server import ApiConfig

from .apikit import FakeFleet, Stack, call, stack, wait_for
from .brokers import Mosquitto
from .scheduler_kit import cli, running_app
from .tlskit import CA


@pytest.fixture(scope="module")
def s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack(tmp_path_factory.mktemp("api")) as st:
        yield st


def shell(command: str, **more: object) -> dict[str, object]:
    return {"type": "shell", "command": command, **more}


def test_401_without_a_token_with_a_wrong_one_and_after_revocation(s: Stack) -> None:
    bare = s.http("GET", "/v1/nodes")
    assert bare.status == 401 and bare.body["code"] == "unauthorized"
    assert bare.headers["www-authenticate"].startswith("Bearer")
    assert s.http("GET", "/v1/nodes", token="ert_nope").status == 401
    assert s.http("GET", "/v1/nodes", headers={"Authorization": "Basic eDp5"}).status == 401
    made = s.http("POST", "/v1/tokens", s.admin, {"name": "short-lived", "role": "viewer"})
    assert made.status == 201
    assert s.http("GET", "/v1/nodes", made.body["token"]).status == 200
    assert s.http("DELETE", "/v1/tokens/short-lived", s.admin).status == 200
    assert s.http("GET", "/v1/nodes", made.body["token"]).status == 401
    assert s.http("DELETE", "/v1/tokens/short-lived", s.admin).status == 404


def test_403_per_role(s: Stack) -> None:
    task = {"targets": [s.node], "task": shell("true")}
    assert s.http("GET", "/v1/tasks", s.viewer).status == 200
    refused = s.http("POST", "/v1/tasks", s.viewer, task)
    assert refused.status == 403 and refused.body["code"] == "forbidden"
    assert s.http("POST", "/v1/tasks/x/cancel", s.viewer, {}).status == 403
    assert s.http("POST", "/v1/jobs", s.viewer, {"steps": [shell("true")]}).status == 403
    for token in (s.viewer, s.operator):
        assert s.http("GET", "/v1/tokens", token).status == 403
        assert s.http("POST", "/v1/tokens", token, {"name": "x"}).status == 403
    assert s.http("POST", "/v1/tasks", s.operator, task).status == 201
    listed = s.http("GET", "/v1/tokens", s.admin).body["tokens"]
    assert {t["name"] for t in listed} >= {"admin", "ops", "eyes"}
    assert all("hash" not in t and "token" not in t for t in listed)


def test_404_and_405_are_json(s: Stack) -> None:
    for path in ("/v1/nope", "/nope", "/v1/tasks/no-such-task", "/v1/jobs/no-such-job",
                 "/v1/nodes/no-such-node", "/static/nope.js"):
        reply = s.http("GET", path, s.admin)
        assert reply.status == 404, path
        assert reply.headers["content-type"].startswith("application/json"), path
        assert reply.body["code"] in ("not_found", "unknown_node"), path
    wrong = s.http("DELETE", "/v1/tasks", s.admin)
    assert wrong.status == 405 and wrong.body["code"] == "method_not_allowed"
    assert set(wrong.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST"}


def test_409_duplicate_task_id_and_cancelling_a_finished_task(s: Stack) -> None:
    api = s.api(s.operator)
    [task] = api.dispatch([s.node], shell("echo once", id="dup-1"))
    api.wait_state(task["id"], s.node, "succeeded")
    again = s.http("POST", "/v1/tasks", s.operator,
                   {"targets": [s.node], "task": shell("echo twice", id="dup-1")})
    assert again.status == 409 and again.body["code"] == "conflict"
    finished = s.http("POST", "/v1/tasks/dup-1/cancel", s.operator, {})
    assert finished.status == 409 and "already finished" in finished.body["error"]


def test_ids_by_unique_prefix_and_ambiguous_ones_list_candidates(s: Stack) -> None:
    api = s.api(s.operator)
    for task_id in ("pfx-aaa-1", "pfx-aab-2"):
        api.dispatch([s.node], shell("true", id=task_id))
    assert api.get("/tasks/pfx-aaa")["tasks"][0]["id"] == "pfx-aaa-1"
    ambiguous = s.http("GET", "/v1/tasks/pfx-aa", s.viewer)
    assert ambiguous.status == 409 and ambiguous.body["code"] == "ambiguous"
    assert ambiguous.body["candidates"] == ["pfx-aaa-1", "pfx-aab-2"]
    assert s.http("GET", f"/v1/nodes/{s.node[:4]}", s.viewer).body["node"] == s.node


def test_413_a_body_too_large_is_refused_while_reading(s: Stack) -> None:
    big = b'{"targets": [], "task": {"type": "shell", "command": "' + b"x" * 2_000_000 + b'"}}'
    declared = s.http("POST", "/v1/tasks", s.operator, raw=big)
    assert declared.status == 413 and declared.body["code"] == "too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    conn.request("POST", "/v1/tasks", body=chunks(), encode_chunked=True,
                 headers={"Authorization": f"Bearer {s.operator}",
                          "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["code"] == "too_large"
    conn.close()


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"targets": ["api-a"], "task": shell("true", timout=5)}, "task.timout", "`timeout`"),
    ({"targets": ["api-a"], "tasks": shell("true")}, "tasks", "unknown key"),
    ({"targets": ["api-a"], "task": shell("true", timeout=-1)}, "task.timeout", "greater"),
    ({"targets": ["api-a"], "task": {"type": "reboot"}}, "task.type", "shell or download"),
    ({"targets": "api-a", "task": shell("true")}, "targets", "list"),
    ({"targets": ["api-a"], "online": "yes", "task": shell("true")}, "online", "true or false"),
    ({"targets": ["api-a"], "task": {"type": "download", "url": "ftp://x/y", "dest": "/tmp/y"}},
     "task.url", "http"),
    ({"targets": ["api-a"]}, "task", "missing"),
])
def test_422_names_the_field(s: Stack, body: dict[str, object], field: str,
                             words: str) -> None:
    reply = s.http("POST", "/v1/tasks", s.operator, body)
    assert reply.status == 422, reply.body
    assert reply.body["code"] == "invalid" and reply.body["field"] == field
    assert words in reply.body["error"]


def test_422_in_jobs_and_queries(s: Stack) -> None:
    job = s.http("POST", "/v1/jobs", s.operator,
                 {"targets": [s.node], "steps": [shell("true"), shell("true", cwdd="/")]})
    assert job.status == 422 and job.body["field"] == "steps.1.cwdd"
    bogus = s.http("GET", "/v1/tasks?state=bogus", s.viewer)
    assert bogus.status == 422 and bogus.body["field"] == "state"
    typo = s.http("GET", "/v1/tasks?limt=5", s.viewer)
    assert typo.status == 422 and typo.body["field"] == "limt" and "`limit`" in typo.body["error"]
    assert s.http("GET", "/v1/tasks?limit=0", s.viewer).status == 422
    assert s.http("GET", "/v1/nodes?fact=nokey", s.viewer).body["field"] == "fact"


def test_400_a_body_that_is_not_json(s: Stack) -> None:
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        reply = s.http("POST", "/v1/tasks", s.operator, raw=raw)
        assert reply.status == 400 and reply.body["code"] == "bad_json"


def test_503_when_the_broker_is_gone(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "m").start()
    try:
        with running_app(broker.url, tmp_path) as app:
            assert app.admin_token and app.api is not None and app.service is not None
            fleet = FakeFleet(broker.url)
            fleet.online(["n503"])
            fleet.close()
            wait_for(lambda: "n503" in app.service.store.online_nodes())
            broker.stop()
            wait_for(lambda: not app.service.messenger.connected.is_set())
            reply = call(app.api.port, "POST", "/v1/tasks", app.admin_token,
                         {"targets": ["n503"], "task": shell("true")})
            assert reply.status == 503 and reply.body["code"] == "broker_unreachable"
            assert "nothing was dispatched" in reply.body["error"]
    finally:
        broker.stop()


def test_lists_page_with_a_cursor_and_carry_no_output_tails(s: Stack) -> None:
    api = s.api(s.operator)
    ids = [f"page-{i}" for i in range(5)]
    for task_id in ids:
        [task] = api.dispatch([s.node], shell(f"echo {task_id}", id=task_id))
    api.wait_state(ids[-1], s.node, "succeeded")
    seen: list[str] = []
    cursor = None
    while True:
        page = api.get("/tasks", node=s.node, limit=2, cursor=cursor)
        assert len(page["tasks"]) <= 2
        seen.extend(t["id"] for t in page["tasks"])
        for task in page["tasks"]:
            assert "stdout" not in (task["result"] or {})
        cursor = page["next"]
        if cursor is None:
            break
    assert [i for i in seen if i.startswith("page-")] == list(reversed(ids))
    assert len(seen) == len(set(seen))
    detail = api.get(f"/tasks/{ids[0]}")["tasks"][0]
    assert detail["result"]["stdout"] == "page-0\n" and detail["updates"]
    nodes = api.get("/nodes", limit=1)
    assert nodes["total"] >= 1 and len(nodes["nodes"]) == 1


def test_node_pages_read_by_state_and_cursor_agree_with_the_filtered_list(s: Stack) -> None:
    """The plain list (state, online, cursor) is read a page at a time from the store;
    with a text filter it goes the other way: both give the same nodes, in order."""
    fleet = FakeFleet(s.mosquitto.url)
    names = [f"npg-{i}" for i in range(7)]
    fleet.online(names)
    for node in names[:2]:
        fleet.client.publish(f"edgerun/nodes/{node}/status", json.dumps(
            {"v": 1, "kind": "status", "node": node, "state": "offline",
             "at": "2026-12-07T00:00:00.000Z"}), qos=1, retain=True).wait_for_publish(30)
    fleet.close()
    api = s.api(s.viewer)
    wait_for(lambda: {n["node"]: n["state"] for n in api.get("/nodes", q="npg-")["nodes"]}
             == {n: "offline" if n in names[:2] else "online" for n in names})

    def walk(**query: object) -> tuple[list[str], int]:
        seen: list[str] = []
        cursor = None
        while True:
            page = api.get("/nodes", limit=2, cursor=cursor, **query)
            assert len(page["nodes"]) <= 2
            seen.extend(n["node"] for n in page["nodes"])
            cursor = page["next"]
            if cursor is None:
                return seen, page["total"]

    every = api.get("/nodes", q="")["nodes"]  # no filter: the paged path, one page
    for query, keep in (({}, lambda n: True), ({"state": "online"}, lambda n: n["state"] ==
                        "online"), ({"state": "offline"}, lambda n: n["state"] == "offline"),
                        ({"online": "1"}, lambda n: n["state"] == "online")):
        seen, total = walk(**query)
        want = sorted(n["node"] for n in every if keep(n))
        assert seen == want and total == len(want), query
        filtered, _ = walk(q="npg-", **query)  # the other path
        assert filtered == [n for n in want if n.startswith("npg-")], query
    assert names[0] in walk(state="offline")[0] and names[3] not in walk(state="offline")[0]
    assert api.get("/nodes", online="1", state="offline")["nodes"] == []
    bad = s.http("GET", "/v1/nodes?state=gone", s.viewer)
    assert bad.status == 422 and bad.body["field"] == "state"


def test_every_dispatch_and_cancel_is_audited_with_the_token_name(s: Stack) -> None:
    api = s.api(s.operator)
    [task] = api.dispatch([s.node], shell("sleep 60", id="audited-1"))
    api.wait_state(task["id"], s.node, "running")
    api.post("/tasks/audited-1/cancel", {})
    api.wait_state(task["id"], s.node, "canceled")
    assert s.app.service is not None
    events = [e for _, e in s.app.service.store.events_after(0, 100_000)
              if e.get("kind") == "audit" and "audited-1" in (e.get("tasks") or [])]
    assert [(e["action"], e["by"], e["role"]) for e in events] == [
        ("dispatch", "ops", "operator"), ("cancel", "ops", "operator")]
    assert events[0]["node"] == s.node
    refused = s.http("GET", "/v1/events?channel=audit", s.viewer)
    assert refused.status == 403


def test_console_page_is_public_and_locked_to_its_own_files(s: Stack) -> None:
    page = s.http("GET", "/")
    assert page.status == 200 and b"<title>edgerun console</title>" in page.raw
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert s.http("GET", "/static/console.js").status == 200


def test_openapi_document_lists_the_routes(s: Stack) -> None:
    doc = s.http("GET", "/v1/openapi.json").body
    assert doc["openapi"].startswith("3.")
    for path in ("/v1/tasks", "/v1/tasks/{id}/cancel", "/v1/jobs/{id}/targets", "/v1/events",
                 "/v1/stream-tickets", "/v1/tokens", "/healthz", "/readyz"):
        assert path in doc["paths"]
    assert "/v1/ws" in doc["info"]["description"]  # OpenAPI describes no WebSocket


def test_first_start_token_file_is_private_and_the_local_cli_finds_it(s: Stack) -> None:
    path = admin_token_file(s.port)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_text().strip() == s.admin
    nodes = cli(s.url, "nodes", env={"EDGERUN_TOKEN": None})
    assert nodes.code == 0 and s.node in nodes.out
    made = cli(s.url, "token", "create", "--role", "viewer", "--name", "from-cli")
    assert made.code == 0, made
    token = made.out.strip()
    assert token.startswith("ert_") and "shown this once" in made.err
    listed = cli(s.url, "token", "list")
    assert "from-cli" in listed.out and token not in listed.out
    viewer_run = cli(s.url, "run", s.node, "--", "true", env={"EDGERUN_TOKEN": token})
    assert viewer_run.code != 0 and "operator" in viewer_run.err
    assert cli(s.url, "token", "revoke", "from-cli").code == 0
    gone = cli(s.url, "nodes", "--token", token)
    assert gone.code != 0 and "revoked" in gone.err


def test_plain_http_beyond_loopback_is_refused_unless_told() -> None:
    with pytest.raises(ConfigError, match="without TLS"):
        ApiConfig("0.0.0.0", 0).check()
    ApiConfig("0.0.0.0", 0, insecure_http=True).check()
    ApiConfig("127.0.0.1", 0).check()
    with pytest.raises(ConfigError, match="together"):
        ApiConfig("0.0.0.0", 0, tls_cert="/x").check()


def test_https_with_a_ca_file(tmp_path: Path) -> None:
    ca = CA(tmp_path / "ca")
    pair = ca.issue("localhost", server=True)
    broker = Mosquitto(tmp_path / "m").start()
    try:
        with running_app(broker.url, tmp_path, tls_cert=str(pair.cert),
                         tls_key=str(pair.key)) as app:
            assert app.api_url.startswith("https://")
            ok = cli(app.api_url, "nodes", "--api-ca-file", str(ca.path))
            assert ok.code == 0, ok
            untrusted = cli(app.api_url, "nodes")
            assert untrusted.code == 4 and "TLS" in untrusted.err
            context = ssl.create_default_context(cafile=str(ca.path))
            with urllib.request.urlopen(f"{app.api_url}/v1/openapi.json",
                                        context=context, timeout=10) as response:
                assert response.status == 200
    finally:
        broker.stop()
