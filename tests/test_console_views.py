"""The console an on-call team uses (issue 24), in headless Chromium against a live service:
the overview as landing view, safe dispatch (only the chosen type's fields, the typed count
above the threshold, a busy state, one task for a double click, an Idempotency-Key),
a glob dispatch as one job, rollouts with pause/resume/abort, keyboard use, relative times,
and axe-core (vendored in tests/axe.min.js, never shipped) with no serious or critical
violation on any view."""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgerun.protocol import format_time

from .apikit import FakeFleet, Stack, stack, wait_for
from .test_console_browser import ARGS, CHROMIUM, login

AXE = Path(__file__).resolve().parent / "axe.min.js"
SIMS = [f"vw-{i:03d}" for i in range(25)]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="chromium is not installed (./build.sh test installs it)")


@pytest.fixture(name="shots", scope="module")
def shots_dir() -> Path:
    directory = Path(os.environ.get("EDGERUN_SCREENSHOTS")
                     or tempfile.mkdtemp(prefix="edgerun-console-"))
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture(name="browser", scope="module")
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield launched
        launched.close()


@pytest.fixture(name="page")
def new_page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    opened = context.new_page()
    opened.set_default_timeout(30_000)
    errors: list[str] = []
    opened.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    yield opened
    context.close()
    assert not [e for e in errors if "Content Security Policy" in e], errors


@pytest.fixture(scope="module")
def s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack(tmp_path_factory.mktemp("views"), node="vw-agent") as st:
        yield st


@pytest.fixture(scope="module")
def fleet(s: Stack) -> Iterator[FakeFleet]:
    fake = FakeFleet(s.mosquitto.url)
    fake.online(SIMS, rack="r9")
    api = s.api()
    wait_for(lambda: api.get("/nodes", match="vw-0*", online=1)["total"] == len(SIMS), 60)
    yield fake
    fake.close()


def go(page: Any, s: Stack, hash_: str, ready: str) -> None:
    page.goto(f"{s.url}/#/{hash_}")
    page.wait_for_selector(ready)


def axe_violations(page: Any) -> list[dict[str, Any]]:
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.evaluate(AXE.read_text(encoding="utf-8"))
    found: list[dict[str, Any]] = page.evaluate(
        "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
        ".map(v => ({id: v.id, impact: v.impact, help: v.help,"
        " nodes: v.nodes.map(n => n.target.join(' ')).slice(0, 5)}))")
    return [v for v in found if v["impact"] in ("serious", "critical")]


def one_visible_h1(page: Any) -> int:
    count: int = page.evaluate(
        "() => [...document.querySelectorAll('h1')].filter(h => h.offsetParent !== null).length")
    return count


def test_the_overview_is_the_landing_view_with_counts_charts_and_failures(
        page: Any, s: Stack, fleet: FakeFleet, shots: Path) -> None:
    api = s.api(s.operator)
    api.post("/jobs", {"id": "vw-ov", "targets": ["vw-00*"],
                       "steps": [{"type": "shell", "command": "fwupdate --check"}]})
    for node in SIMS[:7]:
        fleet.finish(node, "vw-ov.0")
    for node in SIMS[7:10]:
        fleet.finish(node, "vw-ov.0", state="failed", exit_code=1)
    wait_for(lambda: api.get("/jobs/vw-ov")["progress"]["done"] == 10, 60)
    offline = {"v": 1, "kind": "status", "node": "vw-024", "state": "offline",
               "at": format_time(), "agent": "fake", "running": []}
    fleet.client.publish("edgerun/nodes/vw-024/status", json.dumps(offline), qos=1,
                         retain=True).wait_for_publish(30)
    wait_for(lambda: api.get("/overview")["nodes"]["offline"] == 1, 30)

    login(page, s, s.operator)
    page.wait_for_selector("#overview[data-loaded='1']")
    assert page.url.endswith("#/overview")
    assert page.inner_text("#ov-online") == "25"  # 24 simulated + the real agent
    assert page.inner_text("#ov-offline") == "1" and page.inner_text("#ov-lost") == "1"
    assert "vw-024" in page.inner_text("#ov-lost-list")
    assert page.inner_text("#ov-failed") == "3"
    chart = page.locator("#ov-outcomes svg")
    assert chart.get_attribute("data-succeeded") == "7"
    assert chart.get_attribute("data-failed") == "3"
    assert page.locator("#ov-outcomes svg rect").count() >= 1
    assert page.locator("#ov-online-chart svg polyline").count() == 1
    assert page.locator("#ov-online-chart svg").get_attribute("data-now") == "25"
    assert page.locator("#ov-failures tr").count() == 3
    assert one_visible_h1(page) == 1
    # times are relative, the UTC time on hover
    when = page.locator("#ov-failures time").first
    assert when.get_attribute("title").endswith(" UTC")
    assert when.inner_text() in ("just now",) or when.inner_text().endswith("ago")
    page.screenshot(path=str(shots / "overview.png"))
    page.click("#ov-failures tr:first-child a")  # a failure is a link to its task
    page.wait_for_selector("#task:not([hidden]) #task-state[data-state='failed']")


def test_dispatch_shows_only_the_chosen_type_fields(page: Any, s: Stack) -> None:
    login(page, s, s.operator)
    go(page, s, "dispatch", "#dispatch-form")
    assert page.is_visible("#d-command")
    for hidden in ("#d-url", "#d-dest", "#d-sha256", "#d-steps"):
        assert page.is_hidden(hidden), hidden  # `hidden` beats `.stack label {display:grid}`
    page.select_option("#d-type", "download")
    assert page.is_visible("#d-url") and page.is_visible("#d-sha256")
    assert page.is_hidden("#d-command") and page.is_hidden("#d-steps")
    page.select_option("#d-type", "job")
    assert page.is_visible("#d-steps") and page.is_hidden("#d-url")
    assert page.is_hidden("#d-confirm")


def record_posts(page: Any) -> list[dict[str, str]]:
    sent: list[dict[str, str]] = []

    def seen(request: Any) -> None:
        if request.method == "POST" and "/v1/" in request.url:
            sent.append({"url": request.url, **request.headers})
    page.on("request", seen)
    return sent


def test_a_dispatch_to_many_asks_for_the_count_is_busy_and_becomes_one_job(
        page: Any, s: Stack, fleet: FakeFleet, shots: Path) -> None:
    api = s.api(s.operator)
    jobs_before = len(api.get("/jobs", limit=200)["jobs"])
    login(page, s, s.operator)
    posts = record_posts(page)
    go(page, s, "dispatch", "#dispatch-form")
    page.fill("#d-targets", "vw-0*")
    page.fill("#d-command", "ipmitool lan print")
    page.fill("#d-name", "lan check")
    page.evaluate("""() => { window.__busy = false;
        new MutationObserver(() => { if (document.getElementById('d-submit')
            .getAttribute('aria-busy') === 'true') window.__busy = true; })
        .observe(document.getElementById('d-submit'), {attributes: true}); }""")
    page.click("#d-submit")
    page.wait_for_selector("#d-confirm:not([hidden])")
    # vw-024 is offline and still a target: its task waits for it
    assert "sends to 25 nodes" in page.inner_text("#d-confirm-text")
    assert page.is_disabled("#d-submit")
    page.screenshot(path=str(shots / "dispatch-confirm.png"))
    page.fill("#d-confirm-count", "24")
    page.click("#d-confirm-go")
    page.wait_for_selector("#d-confirm-text:has-text('That is not 25')")
    assert not [p for p in posts if p["url"].endswith(("/v1/jobs", "/v1/tasks"))]
    page.fill("#d-confirm-count", "25")
    page.click("#d-confirm-go")
    page.wait_for_selector("#job:not([hidden]) #job-summary[data-tasks='25']")
    assert page.evaluate("window.__busy") is True
    sent = [p for p in posts if p["url"].endswith(("/v1/jobs", "/v1/tasks"))]
    assert len(sent) == 1 and sent[0]["url"].endswith("/v1/jobs")
    assert uuid.UUID(sent[0]["idempotency-key"]).version == 4
    jobs = api.get("/jobs", limit=200)["jobs"]
    assert len(jobs) == jobs_before + 1  # one job, one aggregated progress row
    job = jobs[0]
    assert job["id"].startswith("lan-check-") and job["progress"]["tasks"] == 25
    assert "lan-check-" in page.inner_text("#job-about")
    assert "ops" in page.inner_text("#job-about")  # the creator: the token's name
    page.screenshot(path=str(shots / "job-glob.png"))
    page.goto(f"{s.url}/#/jobs")
    page.wait_for_selector(f"#job-rows tr[data-job='{job['id']}'] .progress")
    api.post(f"/jobs/{job['id']}/cancel", {})


def test_a_double_click_sends_one_task_with_an_idempotency_key(page: Any, s: Stack) -> None:
    marker = f"dbl-{uuid.uuid4().hex[:8]}"
    login(page, s, s.operator)
    posts = record_posts(page)
    go(page, s, "dispatch", "#dispatch-form")
    page.fill("#d-targets", s.node)
    page.fill("#d-command", f"echo {marker}")
    page.dblclick("#d-submit")
    page.wait_for_selector("#task:not([hidden]) #task-state[data-state='succeeded']")
    sent = [p for p in posts if p["url"].endswith(("/v1/tasks", "/v1/jobs"))]
    assert len(sent) == 1 and sent[0]["url"].endswith("/v1/tasks")
    assert sent[0]["idempotency-key"]
    tasks = s.api().get("/tasks", node=s.node, limit=200)["tasks"]
    assert sum(1 for t in tasks if marker in str((t.get("spec") or {}).get("command"))) == 1


def test_rollouts_show_batches_and_the_abort_rule_with_pause_resume_abort(
        page: Any, s: Stack, fleet: FakeFleet, shots: Path) -> None:
    api = s.api(s.operator)
    rollout = api.post("/rollouts", {"targets": ["vw-01*"], "online": True, "batch": 3,
                                     "abort_after": "2",
                                     "task": {"type": "shell", "command": "flash bios"}})
    login(page, s, s.operator)
    go(page, s, "rollouts", f"#rollout-rows tr[data-rollout='{rollout['id']}']")
    page.click(f"#rollout-rows tr[data-rollout='{rollout['id']}'] a")
    page.wait_for_selector("#rollout-state[data-state='running']")
    about = page.inner_text("#rollout-about")
    assert "batches of 3 at once" in about and "abort after 2 failed" in about
    assert "0 of 2 allowed failures" in about
    assert page.get_attribute("#rollout-summary", "data-total") == "10"
    assert page.is_hidden("#rollout-resume")
    page.click("#rollout-pause")
    page.wait_for_selector("#rollout-state[data-state='paused']")
    page.screenshot(path=str(shots / "rollout-paused.png"))
    assert page.is_visible("#rollout-resume") and page.is_hidden("#rollout-pause")
    page.click("#rollout-resume")
    page.wait_for_selector("#rollout-state[data-state='running']")
    page.click("#rollout-abort")
    page.wait_for_selector("#rollout-state[data-state='aborted']")
    assert page.is_hidden("#rollout-abort")
    assert one_visible_h1(page) == 1

    page.evaluate("sessionStorage.clear()")
    login(page, s, s.viewer)
    go(page, s, f"rollout/{rollout['id']}", "#rollout-state[data-state='aborted']")
    assert page.locator("#rollout-pause, #rollout-resume, #rollout-abort").count() == 0


def test_rows_are_links_reached_and_opened_by_keyboard(page: Any, s: Stack) -> None:
    [task] = s.api(s.operator).dispatch([s.node], {"type": "shell", "command": "echo kb"})
    s.api().wait_state(task["id"], s.node, "succeeded")
    login(page, s, s.operator)
    go(page, s, "tasks", f"#task-rows tr[data-task='{task['id']}']")
    page.focus("#tasks-node")
    for _ in range(60):  # Tab through the filters into the rows
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.closest('#task-rows') !== null"):
            break
    assert page.evaluate("document.activeElement.tagName") == "A"
    href = page.evaluate("document.activeElement.getAttribute('href')")
    page.keyboard.press("Enter")
    page.wait_for_selector("#task:not([hidden]) #task-state[data-state]")
    assert page.url.endswith(href)


def test_axe_finds_no_serious_or_critical_violation_on_any_view(
        page: Any, s: Stack, fleet: FakeFleet) -> None:
    api = s.api(s.operator)
    [task] = api.dispatch([s.node], {"type": "shell", "command": "echo axe"})
    api.wait_state(task["id"], s.node, "succeeded")
    job = api.post("/jobs", {"targets": ["vw-00*"], "steps": [
        {"name": "a", "type": "shell", "command": "true"},
        {"name": "b", "needs": ["a"], "targets": ["vw-001"], "type": "shell",
         "command": "true"}]})
    rollout = api.post("/rollouts", {"targets": ["vw-02*"], "batch": 2,
                                     "task": {"type": "shell", "command": "true"}})
    page.goto(s.url + "/")
    page.wait_for_selector("#login:not([hidden])")
    problems = {"login": axe_violations(page)}
    assert one_visible_h1(page) == 1
    login(page, s, s.operator)
    views = {"overview": "#overview[data-loaded='1']", "fleet": "#nodes tr",
             "tasks": "#task-rows tr", f"task/{task['id']}/{s.node}": "#task-updates li",
             "jobs": "#job-rows tr", f"job/{job['id']}": "#job-targets tr",
             "rollouts": "#rollout-rows tr", f"rollout/{rollout['id']}": "#rollout-targets tr",
             "dispatch": "#dispatch-form"}
    for view, ready in views.items():
        go(page, s, view, ready)
        problems[view] = axe_violations(page)
        assert one_visible_h1(page) == 1, view
        if view.startswith("job/"):  # a graph: each step with its own targets and progress
            assert page.get_attribute("#job-summary", "data-tasks") == "11"
            assert page.inner_text("#job-steps tr[data-step='a'] .step-progress") == "0/10"
            assert page.inner_text("#job-steps tr[data-step='b'] .step-progress") == "0/1"
            assert "vw-001" in page.inner_text("#job-steps tr[data-step='b']")
            assert "a" in page.inner_text("#job-steps tr[data-step='b']")  # what it needs
    page.fill("#d-targets", "vw-0*")
    page.fill("#d-command", "true")
    page.click("#d-submit")
    page.wait_for_selector("#d-confirm:not([hidden])")
    problems["dispatch-confirm"] = axe_violations(page)
    assert not {k: v for k, v in problems.items() if v}, problems
    api.post(f"/rollouts/{rollout['id']}/abort", {})


def test_streams_open_with_single_use_tickets_never_the_token_in_a_url(
        page: Any, s: Stack) -> None:
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    [task] = s.api(s.operator).dispatch([s.node], {"type": "shell", "command": "echo tk"})
    login(page, s, s.operator)
    go(page, s, f"task/{task['id']}/{s.node}", "#task-state[data-state='succeeded']")
    page.wait_for_selector("#output:has-text('tk')")
    streams = [u for u in urls if "/v1/events" in u]
    assert len(streams) >= 2  # the live lists and the task's output
    assert all("ticket=ers_" in u for u in streams), streams
    assert not [u for u in urls if s.operator in u or "access_token" in u]
    tickets = [u.split("ticket=")[1].split("&")[0] for u in streams]
    assert len(set(tickets)) == len(tickets)  # one ticket per connection


def test_a_stream_the_browser_gave_up_on_is_opened_again_with_a_fresh_ticket(
        page: Any, s: Stack) -> None:
    seen: list[str] = []

    def events(route: Any) -> None:
        seen.append(route.request.url)
        if len(seen) == 1:  # the first connection is refused: EventSource closes for good
            route.fulfill(status=503, body="")
        else:
            route.continue_()
    page.route("**/v1/events?*", events)
    login(page, s, s.operator)
    go(page, s, "tasks", "#task-filter")
    page.wait_for_selector("#live:has-text('● live')")
    assert len(seen) >= 2 and seen[0] != seen[1]  # a new ticket, not the spent one
    [task] = s.api(s.operator).dispatch([s.node], {"type": "shell", "command": "echo again"})
    page.wait_for_selector(f"#task-rows tr[data-task='{task['id']}'] td[data-state='succeeded']")
