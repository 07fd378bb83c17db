"""The console in a real browser: headless Chromium (Debian's package) driven by Playwright,
against `edgerun serve` in-process with a real agent, and a job on 1,000 simulated nodes.

Screenshots go to $EDGERUN_SCREENSHOTS, else a temporary directory (printed)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .apikit import FakeFleet, Stack, stack, wait_for
from .scheduler_kit import start_agent

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="chromium is not installed (./build.sh test installs it)")


@pytest.fixture(scope="module")
def shots() -> Path:
    directory = Path(os.environ.get("EDGERUN_SCREENSHOTS")
                     or tempfile.mkdtemp(prefix="edgerun-console-"))
    directory.mkdir(parents=True, exist_ok=True)
    print(f"console screenshots: {directory}")
    return directory


@pytest.fixture(scope="module")
def s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack(tmp_path_factory.mktemp("console"), node="web-a") as st:
        yield st


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    yield page
    context.close()
    # the page's Content-Security-Policy (no inline script or style) never got in its way
    assert not [e for e in errors if "Content Security Policy" in e], errors


def login(page: Any, s: Stack, token: str) -> None:
    page.goto(s.url + "/")
    page.fill("#token", token)
    page.click("#login-form button")
    page.wait_for_selector("#who:has-text('(')")


def test_log_in_and_watch_a_node_come_online_without_reloading(
        page: Any, s: Stack, shots: Path, tmp_path: Path) -> None:
    login(page, s, s.operator)
    page.wait_for_selector("#overview:not([hidden])")  # the landing view
    page.click("nav a[data-tab='fleet']")
    page.wait_for_selector(f"#nodes tr[data-node='{s.node}'] td[data-state='online']")
    page.evaluate("window.__not_reloaded = true")
    agent = start_agent(s.mosquitto.url, "web-b", tmp_path)
    try:
        page.wait_for_selector("#nodes tr[data-node='web-b'] td[data-state='online']")
        assert page.evaluate("window.__not_reloaded") is True
        page.screenshot(path=str(shots / "fleet.png"))
        agent.terminate()
        page.wait_for_selector("#nodes tr[data-node='web-b'] td[data-state='offline']")
        assert page.evaluate("window.__not_reloaded") is True
    finally:
        agent.kill()


def dispatch(page: Any, target: str, command: str, timeout: int = 120) -> None:
    page.goto(page.url.split("#")[0] + "#/dispatch")
    page.fill("#d-targets", target)
    page.select_option("#d-type", "shell")
    page.fill("#d-command", command)
    page.fill("#d-timeout", str(timeout))
    page.click("#dispatch-form button[type=submit]")
    page.wait_for_selector("#task:not([hidden])")


def test_dispatch_echo_hello_and_see_it_stream_in(page: Any, s: Stack, shots: Path) -> None:
    login(page, s, s.operator)
    dispatch(page, s.node, "echo hello; sleep 1; echo again")
    page.wait_for_selector("#output:has-text('hello')")
    page.wait_for_selector("#task-state[data-state='succeeded']")
    assert "again" in page.inner_text("#output")
    page.screenshot(path=str(shots / "task-output.png"))


def test_cancel_a_sleep_60_and_see_it_canceled(page: Any, s: Stack, shots: Path) -> None:
    login(page, s, s.operator)
    dispatch(page, s.node, "sleep 60")
    page.wait_for_selector("#task-state[data-state='running']")
    page.click("#task-cancel")
    page.wait_for_selector("#task-state[data-state='canceled']")
    assert page.is_hidden("#task-cancel")
    page.screenshot(path=str(shots / "task-canceled.png"))


def test_a_viewer_gets_no_controls_and_the_api_refuses_it(
        page: Any, s: Stack, shots: Path) -> None:
    [task] = s.api(s.operator).dispatch([s.node], {"type": "shell", "command": "sleep 30"})
    login(page, s, s.viewer)
    assert page.locator("nav a[data-tab='dispatch']").count() == 0
    page.goto(f"{s.url}/#/task/{task['id']}/{s.node}")
    page.wait_for_selector("#task-state[data-state='running']")
    assert page.locator("#task-cancel").count() == 0
    assert page.locator("#dispatch-form").count() == 0
    status = page.evaluate("""async ([token, node]) => (await fetch('/v1/tasks', {
        method: 'POST', headers: {'Authorization': 'Bearer ' + token,
                                  'Content-Type': 'application/json'},
        body: JSON.stringify({targets: [node], task: {type: 'shell', command: 'true'}})
    })).status""", [s.viewer, s.node])
    assert status == 403
    cancel = page.evaluate("""async ([token, id]) => (await fetch(`/v1/tasks/${id}/cancel`, {
        method: 'POST', headers: {'Authorization': 'Bearer ' + token}, body: '{}'})).status""",
                           [s.viewer, task["id"]])
    assert cancel == 403
    page.screenshot(path=str(shots / "viewer.png"))
    s.api(s.operator).post(f"/tasks/{task['id']}/cancel", {})


def test_a_job_on_1000_nodes_shows_one_aggregated_row_and_paged_targets(
        page: Any, s: Stack, shots: Path) -> None:
    nodes = [f"sim-{i:04d}" for i in range(1000)]
    fleet = FakeFleet(s.mosquitto.url)
    try:
        fleet.online(nodes, rack="r1")
        api = s.api(s.operator)
        wait_for(lambda: api.get("/nodes", match="sim-*", online=1, limit=1)["total"] == 1000,
                 120)
        job = api.post("/jobs", {"targets": ["sim-*"], "steps": [
            {"type": "shell", "command": "lshw -short"},
            {"type": "shell", "command": "ipmitool lan print"}]})
        job_id = job["id"]
        assert job["progress"]["tasks"] == 2000 and len(job["tasks"]) == 2000
        login(page, s, s.operator)
        page.goto(f"{s.url}/#/job/{job_id}")
        page.wait_for_selector("#job-summary[data-tasks='2000']")
        page.wait_for_selector("#job-targets tr[data-node='sim-0099']")
        assert page.locator("#job-targets tr").count() == 100  # tasks paged, not 2,000 rows
        for node in nodes:  # every simulated node runs step 1
            fleet.finish(node, f"{job_id}.0")
        for node in nodes[:10]:  # ten fail step 2, so their job ends there
            fleet.finish(node, f"{job_id}.1", state="failed", exit_code=1)
        page.wait_for_selector("#job-summary[data-done='1010'][data-failed='10']", timeout=120_000)
        summary = page.inner_text("#job-summary")
        assert "1000 nodes" in summary and "1010/2000 done, 10 failed" in summary
        assert page.locator("#job-steps tr").count() == 2
        width = page.evaluate("document.querySelector('#job-summary .bar .ok').style.width")
        assert width == "50%"  # 1,000 of 2,000 succeeded
        # failures first: the ten failed tasks head the list without any filter
        page.wait_for_selector("#job-targets tr:first-child td[data-state='failed']")
        states = page.eval_on_selector_all("#job-targets tr td.state",
                                           "c => c.map(x => x.dataset.state)")
        assert states[:10] == ["failed"] * 10 and "failed" not in states[10:]
        page.screenshot(path=str(shots / "job-1000.png"), full_page=False)
        page.select_option("#job-state", "failed")
        page.wait_for_function("() => document.querySelectorAll('#job-targets tr').length === 10")
        assert page.is_disabled("#job-next")
        page.select_option("#job-state", "")
        page.wait_for_function("() => document.querySelectorAll('#job-targets tr').length === 100")
        page.click("#job-next")
        page.wait_for_selector("#job-prev:not([disabled])")
        assert page.locator("#job-targets tr").count() == 100
        page.goto(f"{s.url}/#/jobs")
        row = page.wait_for_selector(f"#job-rows tr[data-job='{job_id}']")
        assert "1010/2000 done, 10 failed" in row.inner_text()
        api.post(f"/jobs/{job_id}/cancel", {})
        # the overview at 1,000 nodes: one read of aggregates, the ten failures linked
        page.goto(f"{s.url}/#/overview")
        page.wait_for_selector("#overview[data-loaded='1']")
        assert int(page.inner_text("#ov-online")) >= 1000
        assert page.inner_text("#ov-failed") == "10"
        assert page.locator("#ov-failures tr").count() == 10
        # a root command to every simulated node: the operator types 1000, then one job
        page.goto(f"{s.url}/#/dispatch")
        page.fill("#d-targets", "sim-*")
        page.fill("#d-command", "reboot")
        page.click("#d-submit")
        page.wait_for_selector("#d-confirm:not([hidden])")
        assert "sends to 1000 nodes" in page.inner_text("#d-confirm-text")
        page.fill("#d-confirm-count", "1000")
        page.click("#d-confirm-go")
        page.wait_for_selector("#job:not([hidden]) #job-summary[data-tasks='1000']",
                               timeout=120_000)
        api.post(f"/jobs/{page.inner_text('#job-id')}/cancel", {})
    finally:
        fleet.close()


def test_output_is_tailed_and_capped_in_the_page(page: Any, s: Stack, shots: Path) -> None:
    login(page, s, s.operator)
    dispatch(page, s.node, "i=0; while [ $i -lt 6000 ]; do "
                           "echo line-$i-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; "
                           "i=$((i+1)); done")
    page.wait_for_selector("#task-state[data-state='succeeded']")
    page.wait_for_selector("#output:has-text('line-5999-')")
    size = page.evaluate("document.getElementById('output').textContent.length")
    assert size <= 256 * 1024


def node_rows(page: Any) -> list[str]:
    rows: list[str] = page.eval_on_selector_all("#nodes tr", "rs => rs.map(r => r.dataset.node)")
    return rows


def filter_facts(page: Any, expr: str) -> None:
    page.fill("#fleet-fact", expr)
    page.click("#fleet-filter button[type=submit]")


def wait_rows(page: Any, nodes: list[str]) -> None:
    page.wait_for_function("""want => JSON.stringify([...document.querySelectorAll('#nodes tr')]
        .map(r => r.dataset.node)) === JSON.stringify(want)""", arg=nodes)


def test_the_fact_filter_speaks_where_labels_included(
        page: Any, s: Stack, shots: Path, tmp_path: Path) -> None:
    """`labels.rack=r1` shows the node an agent labelled so, `labels.rack=r2` hides it: the
    API judges (fleet/targets.py, as `--where`), at the first read and for live events.
    A bad expression says why beside the form and leaves the list as it was."""
    thrown: list[str] = []
    page.on("pageerror", lambda exc: thrown.append(str(exc)))
    fleet = FakeFleet(s.mosquitto.url)
    agent = start_agent(s.mosquitto.url, "web-r1", tmp_path, "--label", "rack=r1")
    try:
        fleet.online(["web-sim-r2"], labels={"rack": "r2"})
        api = s.api()
        wait_for(lambda: api.get("/nodes", fact="labels.rack=r1")["total"] == 1
                 and api.get("/nodes", fact="labels.rack=r2")["total"] == 1, 60)
        login(page, s, s.viewer)
        page.click("nav a[data-tab='fleet']")
        page.wait_for_selector("#nodes tr")

        filter_facts(page, "labels.rack=r1")
        wait_rows(page, ["web-r1"])
        assert page.inner_text("#fleet-count") == "1 nodes"
        filter_facts(page, "labels.rack=r2")
        wait_rows(page, ["web-sim-r2"])

        # a bad expression: a clear message, the input marked, the list left as it was
        filter_facts(page, "labels.rack")
        page.wait_for_selector("#fleet-error:has-text('no operator')")
        assert page.get_attribute("#fleet-fact", "aria-invalid") == "true"
        assert node_rows(page) == ["web-sim-r2"]
        filter_facts(page, "labels.rack=" + "r" * 600)
        page.wait_for_selector("#fleet-error:has-text('the limit is 512')")
        page.screenshot(path=str(shots / "fleet-fact-error.png"))

        # live, with labels.rack=r1 applied: a node labelled r2 coming online stays out,
        # one labelled r1 comes in, the matching node going offline is updated in place
        filter_facts(page, "labels.rack=r1")
        wait_rows(page, ["web-r1"])
        assert page.inner_text("#fleet-error") == ""
        assert page.get_attribute("#fleet-fact", "aria-invalid") is None
        page.evaluate("window.__not_reloaded = true")
        fleet.online(["web-sim-r2b"], labels={"rack": "r2"})
        wait_for(lambda: api.get("/nodes", fact="labels.rack=r2")["total"] == 2, 30)
        fleet.online(["web-sim-r1"], labels={"rack": "r1"})
        page.wait_for_selector("#nodes tr[data-node='web-sim-r1']")
        assert node_rows(page) == ["web-r1", "web-sim-r1"]
        assert page.inner_text("#fleet-count") == "2 nodes"
        agent.terminate()
        page.wait_for_selector("#nodes tr[data-node='web-r1'] td[data-state='offline']")
        assert page.evaluate("window.__not_reloaded") is True
        page.screenshot(path=str(shots / "fleet-fact.png"))
    finally:
        agent.kill()
        fleet.close()
    assert not thrown, thrown
