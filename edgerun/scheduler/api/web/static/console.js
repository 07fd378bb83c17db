// edgerun console: plain JavaScript, no build step, no CDN. Everything a node sends
// (ids, facts, output) is put in the page with textContent, never as HTML.
"use strict";

const FINAL = new Set(["succeeded", "failed", "timed_out", "canceled", "rejected", "lost"]);
const STATES = ["queued", "dispatched", "accepted", "running", "succeeded", "failed",
  "timed_out", "canceled", "rejected", "lost"];
const OUTPUT_CAP = 256 * 1024;   // characters of output kept in the page per task
const TASK_ROWS_CAP = 500;       // rows kept in the live task list
const TARGETS_PAGE = 100;

const $ = (id) => document.getElementById(id);
const state = { token: sessionStorage.getItem("edgerun-token"), who: null, stream: null,
  output: null, nodesNext: null, tasksNext: null, jobsNext: null, jobTimer: null,
  jobCursors: [null], jobPage: 0 };

// --- helpers -------------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}
const stateCell = (s) => el("td", { class: "state s-" + s, "data-state": s }, s);
const time = (t) => (t || "").replace("T", " ").slice(0, 19);
const isOperator = () => state.who && (state.who.role === "operator" || state.who.role === "admin");

function showError(message) { $("error").textContent = message || ""; }

async function api(method, path, body) {
  const response = await fetch("/v1" + path, {
    method, headers: { "Authorization": "Bearer " + state.token,
      ...(body ? { "Content-Type": "application/json" } : {}) },
    body: body ? JSON.stringify(body) : undefined });
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) {
    const err = new Error((data && data.error) || ("HTTP " + response.status));
    err.status = response.status;
    err.code = data && data.code;
    throw err;
  }
  return data;
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (Array.isArray(v)) v.forEach((x) => q.append(k, x));
    else if (v !== null && v !== undefined && v !== "" && v !== false) q.append(k, v);
  }
  const text = q.toString();
  return text ? "?" + text : "";
}

// --- login ---------------------------------------------------------------------------
async function login(token) {
  state.token = token;
  try {
    state.who = await api("GET", "/whoami");
  } catch (e) {
    state.token = null;
    sessionStorage.removeItem("edgerun-token");
    $("login-error").textContent = e.message;
    return false;
  }
  sessionStorage.setItem("edgerun-token", token);
  $("who").textContent = `${state.who.name} (${state.who.role})`;
  $("who").dataset.role = state.who.role;
  $("nav").hidden = false;
  $("logout").hidden = false;
  for (const node of document.querySelectorAll(".operator-only")) {
    if (!isOperator()) node.remove();   // a viewer gets no dispatch or cancel controls
  }
  openStream();
  if (!location.hash || location.hash === "#/login") location.hash = "#/fleet";
  else route();
  return true;
}

$("login-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  login($("token").value.trim());
});
$("logout").addEventListener("click", () => {
  sessionStorage.removeItem("edgerun-token");
  location.hash = "";
  location.reload();
});

// --- live events (Server-Sent Events) ----------------------------------------------
function openStream() {
  if (state.stream) state.stream.close();
  const url = "/v1/events" + query({ channel: ["nodes", "tasks"], access_token: state.token });
  const source = new EventSource(url);
  state.stream = source;
  source.addEventListener("open", () => { $("live").textContent = "● live"; });
  source.addEventListener("error", () => { $("live").textContent = "○ reconnecting"; });
  source.addEventListener("node_event", (ev) => onNode(JSON.parse(ev.data).info));
  source.addEventListener("task_event", (ev) => onTask(JSON.parse(ev.data).task));
  source.addEventListener("reset", () => route());  // we missed events: read again
}

// --- fleet -------------------------------------------------------------------------------
function nodeFilters() {
  return { q: $("fleet-q").value.trim(), match: $("fleet-match").value.trim(),
    fact: $("fleet-fact").value.trim(), online: $("fleet-online").checked ? "1" : "" };
}

function nodeRow(n) {
  const f = n.facts || {};
  const ips = Object.values(f.ips || {}).flat().map((a) => String(a).split("/")[0])
    .filter((a) => !a.startsWith("127.") && !a.startsWith("fe80:") && a !== "::1");
  return el("tr", { "data-node": n.node },
    el("td", {}, n.node), stateCell(n.state), el("td", {}, time(n.last_seen)),
    el("td", {}, f.hostname || ""), el("td", {}, f.arch || ""), el("td", {}, f.cpus || ""),
    el("td", {}, ips.join(" ")), el("td", {}, n.agent || ""));
}

async function loadNodes(more) {
  const params = { ...nodeFilters(), limit: 200, cursor: more ? state.nodesNext : null };
  const data = await api("GET", "/nodes" + query(params));
  if (!more) $("nodes").replaceChildren();
  for (const n of data.nodes) $("nodes").append(nodeRow(n));
  state.nodesNext = data.next;
  $("nodes-more").hidden = !data.next;
  state.nodesTotal = data.total;
  $("fleet-count").textContent = `${data.total} nodes`;
}

function nodeVisible(n) {
  const f = nodeFilters();
  if (f.online && n.state !== "online") return false;
  if (f.q && !(n.node + JSON.stringify(n.facts || {})).toLowerCase().includes(f.q.toLowerCase())) return false;
  if (f.match) {
    const re = new RegExp("^" + f.match.replace(/[.+^${}()|\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".") + "$");
    if (!re.test(n.node)) return false;
  }
  if (f.fact) {
    const [k, v] = f.fact.split("=");
    if (String((n.facts || {})[k]) !== v) return false;
  }
  return true;
}

function onNode(n) {
  if (!n) return;
  const existing = document.querySelector(`#nodes tr[data-node="${CSS.escape(n.node)}"]`);
  if (!nodeVisible(n)) {
    if (existing) { existing.remove(); state.nodesTotal -= 1; $("fleet-count").textContent = `${state.nodesTotal} nodes`; }
    return;
  }
  const row = nodeRow(n);
  if (existing) { existing.replaceWith(row); return; }
  state.nodesTotal = (state.nodesTotal || 0) + 1;
  $("fleet-count").textContent = `${state.nodesTotal} nodes`;
  const rows = [...$("nodes").children];
  const after = rows.find((r) => r.dataset.node > n.node);
  if (after) $("nodes").insertBefore(row, after);
  else if (!state.nodesNext) $("nodes").append(row);   // beyond this page: the next one has it
}

$("fleet-filter").addEventListener("submit", (ev) => { ev.preventDefault(); loadNodes(false).catch((e) => showError(e.message)); });
$("nodes-more").addEventListener("click", () => loadNodes(true).catch((e) => showError(e.message)));

// --- tasks ---------------------------------------------------------------------------------
for (const s of STATES) $("tasks-state").append(el("option", { value: s }, s));

function taskRow(t) {
  const error = t.error ? `${t.error.code}: ${t.error.message}` : "";
  return el("tr", { class: "clickable", "data-task": t.id, "data-node": t.node,
    onclick: () => { location.hash = `#/task/${encodeURIComponent(t.id)}/${encodeURIComponent(t.node)}`; } },
    el("td", {}, t.id), el("td", {}, t.node), el("td", {}, t.type || ""), stateCell(t.state),
    el("td", {}, t.exit_code ?? ""), el("td", {}, time(t.updated_at)), el("td", {}, error));
}

function taskFilters() {
  return { node: $("tasks-node").value.trim(), state: $("tasks-state").value,
    job: $("tasks-job").value.trim() };
}

async function loadTasks(more) {
  const data = await api("GET", "/tasks" + query({ ...taskFilters(), limit: 100,
    cursor: more ? state.tasksNext : null }));
  if (!more) $("task-rows").replaceChildren();
  for (const t of data.tasks) $("task-rows").append(taskRow(t));
  state.tasksNext = data.next;
  $("tasks-more").hidden = !data.next;
}

function onTask(t) {
  if (!t) return;
  const selector = `#task-rows tr[data-task="${CSS.escape(t.id)}"][data-node="${CSS.escape(t.node)}"]`;
  const existing = document.querySelector(selector);
  const f = taskFilters();
  const wanted = (!f.node || f.node === t.node) && (!f.state || f.state === t.state) &&
    (!f.job || f.job === t.job);
  if (existing) { if (wanted) existing.replaceWith(taskRow(t)); else existing.remove(); }
  else if (wanted) {
    $("task-rows").prepend(taskRow(t));
    while ($("task-rows").children.length > TASK_ROWS_CAP) $("task-rows").lastChild.remove();
  }
  if (state.detail && state.detail.id === t.id && state.detail.node === t.node) showTaskState(t);
}

$("task-filter").addEventListener("submit", (ev) => { ev.preventDefault(); loadTasks(false).catch((e) => showError(e.message)); });
$("tasks-more").addEventListener("click", () => loadTasks(true).catch((e) => showError(e.message)));

// --- one task, its output live ------------------------------------------------------------
function appendOutput(stream, text) {
  const pre = $("output");
  pre.append(el("span", { class: stream }, text));
  let size = pre.textContent.length;
  while (size > OUTPUT_CAP && pre.firstChild) {   // keep the tail, drop the oldest
    size -= pre.firstChild.textContent.length;
    pre.firstChild.remove();
    $("output-note").textContent = `(only the last ${OUTPUT_CAP / 1024} KiB are shown)`;
  }
  pre.scrollTop = pre.scrollHeight;
}

function showTaskState(t) {
  $("task-state").textContent = t.state;
  $("task-state").className = "state s-" + t.state;
  $("task-state").dataset.state = t.state;
  const cancel = $("task-cancel");
  if (cancel) cancel.hidden = FINAL.has(t.state);
  const fields = [["type", t.type], ["exit code", t.exit_code],
    ["error", t.error ? `${t.error.code}: ${t.error.message}` : null],
    ["command", t.spec && (t.spec.command || t.spec.url)], ["created", t.created_at],
    ["updated", t.updated_at], ["timeout", t.timeout], ["job", t.job]];
  $("task-fields").replaceChildren(...fields.filter(([, v]) => v !== null && v !== undefined)
    .flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, Array.isArray(v) ? v.join(" ") : v)]));
}

async function showTask(id, node) {
  if (state.output) { state.output.close(); state.output = null; }
  state.detail = { id, node };
  $("task-id").textContent = id;
  $("task-node").textContent = node;
  $("output").replaceChildren();
  $("output-note").textContent = "";
  // subscribe first, then read: no output falls between the two
  const url = "/v1/events" + query({ channel: ["output", "tasks"], task: id, node,
    access_token: state.token });
  const source = new EventSource(url);
  state.output = source;
  let live = false;
  source.addEventListener("output", (ev) => { live = true; const o = JSON.parse(ev.data); appendOutput(o.stream, o.data); });
  source.addEventListener("task_event", async (ev) => {
    const t = JSON.parse(ev.data).task;
    showTaskState(t);
    if (FINAL.has(t.state)) await refreshDetail(id, node, !live);
  });
  await new Promise((resolve) => {
    source.addEventListener("hello", resolve, { once: true });
    setTimeout(resolve, 3000);
  });
  const data = await api("GET", `/tasks/${encodeURIComponent(id)}` + query({ node }));
  const t = data.tasks[0];
  showTaskState(t);
  $("task-updates").replaceChildren(...(t.updates || []).map((u) => el("li", {}, `${time(u.at)} ${u.state}`)));
  if (FINAL.has(t.state) && !live) showTails(t);
}

async function refreshDetail(id, node, tails) {
  const data = await api("GET", `/tasks/${encodeURIComponent(id)}` + query({ node }));
  const t = data.tasks[0];
  $("task-updates").replaceChildren(...(t.updates || []).map((u) => el("li", {}, `${time(u.at)} ${u.state}`)));
  if (tails) showTails(t);
}

function showTails(t) {
  const r = t.result || {};
  $("output").replaceChildren();
  if (r.stdout) appendOutput("stdout", r.stdout);
  if (r.stderr) appendOutput("stderr", r.stderr);
  if (r.truncated) $("output-note").textContent = "(the node kept only the last 64 KiB)";
}

if ($("task-cancel")) $("task-cancel").addEventListener("click", async () => {
  try {
    await api("POST", `/tasks/${encodeURIComponent(state.detail.id)}/cancel`, { node: state.detail.node });
  } catch (e) { showError(e.message); }
});

// --- jobs: one aggregated row each, targets paged --------------------------------------------
function bar(p) {
  const total = p.tasks || 1;
  const ok = (100 * p.succeeded) / total, bad = (100 * p.failed) / total;
  const okPart = el("span", { class: "ok" }), badPart = el("span", { class: "bad" });
  // through the CSSOM: the page's Content-Security-Policy allows no inline styles
  Object.assign(okPart.style, { left: "0", width: `${ok}%` });
  Object.assign(badPart.style, { left: `${ok}%`, width: `${bad}%` });
  return el("span", {}, el("span", { class: "bar" }, okPart, badPart),
    ` ${p.done}/${p.tasks} done, ${p.failed} failed`);
}

async function loadJobs(more) {
  const data = await api("GET", "/jobs" + query({ limit: 50, cursor: more ? state.jobsNext : null }));
  if (!more) $("job-rows").replaceChildren();
  for (const j of data.jobs) {
    $("job-rows").append(el("tr", { class: "clickable", "data-job": j.id,
      onclick: () => { location.hash = "#/job/" + encodeURIComponent(j.id); } },
      el("td", {}, j.id), el("td", {}, time(j.created_at)), el("td", {}, j.nodes),
      el("td", {}, j.steps.length), el("td", { class: "progress" }, bar(j.progress))));
  }
  state.jobsNext = data.next;
  $("jobs-more").hidden = !data.next;
}
$("jobs-more").addEventListener("click", () => loadJobs(true).catch((e) => showError(e.message)));

async function refreshJob(id) {
  const job = await api("GET", "/jobs/" + encodeURIComponent(id));
  const p = job.progress;
  $("job-id").textContent = job.id;
  $("job-summary").replaceChildren(`${job.nodes} nodes × ${job.steps.length} steps: `, bar(p));
  $("job-summary").dataset.done = p.done;
  $("job-summary").dataset.failed = p.failed;
  $("job-summary").dataset.tasks = p.tasks;
  $("job-steps").replaceChildren(...p.steps.map((s) => {
    const spec = job.steps[s.step] || {};
    const states = Object.entries(s.states).sort().map(([k, n]) => `${n} ${k}`).join(", ");
    const done = Object.entries(s.states).filter(([k]) => FINAL.has(k)).reduce((a, [, n]) => a + n, 0);
    return el("tr", {}, el("td", {}, s.step + 1), el("td", {}, spec.command || spec.url || ""),
      el("td", {}, `${done}/${job.nodes}`), el("td", {}, states));
  }));
  const cancel = $("job-cancel");
  if (cancel) cancel.hidden = p.done >= p.tasks;
  const cursor = state.jobCursors[state.jobPage];
  const page = await api("GET", `/jobs/${encodeURIComponent(id)}/targets` + query({ limit: TARGETS_PAGE, cursor }));
  $("job-targets-head").replaceChildren(el("tr", {}, el("th", {}, "node"),
    ...job.steps.map((_, i) => el("th", {}, `step ${i + 1}`))));
  $("job-targets").replaceChildren(...page.targets.map((t) => el("tr", { "data-node": t.node },
    el("td", {}, t.node), ...t.steps.map((s) => {
      const cell = stateCell(s.state);
      cell.classList.add("clickable");
      cell.addEventListener("click", () => { location.hash = `#/task/${encodeURIComponent(s.id)}/${encodeURIComponent(t.node)}`; });
      return cell;
    }))));
  state.jobCursors[state.jobPage + 1] = page.next;
  $("job-next").disabled = !page.next;
  $("job-prev").disabled = state.jobPage === 0;
  $("job-page-note").textContent = `page ${state.jobPage + 1}, ${TARGETS_PAGE} a page`;
}

function showJob(id) {
  state.jobCursors = [null];
  state.jobPage = 0;
  const tick = () => refreshJob(id).catch((e) => showError(e.message));
  tick();
  state.jobTimer = setInterval(tick, 1500);   // one aggregated row: cheap at any fleet size
}
$("job-next").addEventListener("click", () => { state.jobPage += 1; refreshJob($("job-id").textContent); });
$("job-prev").addEventListener("click", () => { state.jobPage = Math.max(0, state.jobPage - 1); refreshJob($("job-id").textContent); });
if ($("job-cancel")) $("job-cancel").addEventListener("click", async () => {
  try { await api("POST", `/jobs/${encodeURIComponent($("job-id").textContent)}/cancel`, {}); }
  catch (e) { showError(e.message); }
});

// --- dispatch ------------------------------------------------------------------------------------
function showTypeFields() {
  const type = $("d-type").value;
  for (const kind of ["shell", "download", "job"]) {
    for (const node of document.querySelectorAll(".for-" + kind)) node.hidden = kind !== type;
  }
}
if ($("d-type")) $("d-type").addEventListener("change", showTypeFields);

if ($("dispatch-form")) $("dispatch-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const targets = $("d-targets").value.split(/[\s,]+/).filter(Boolean);
  const online = $("d-online").checked;
  const timeout = Number($("d-timeout").value) || undefined;
  const type = $("d-type").value;
  try {
    if (type === "job") {
      const steps = $("d-steps").value.split("\n").map((c) => c.trim()).filter(Boolean)
        .map((command) => ({ type: "shell", command, timeout }));
      const job = await api("POST", "/jobs", { targets, online, steps });
      location.hash = "#/job/" + encodeURIComponent(job.id);
      return;
    }
    const task = type === "shell" ? { type, command: $("d-command").value, timeout }
      : { type, url: $("d-url").value, dest: $("d-dest").value, timeout,
        ...($("d-sha256").value ? { sha256: $("d-sha256").value } : {}) };
    const data = await api("POST", "/tasks", { targets, online, task });
    const first = data.tasks[0];
    if (data.tasks.length === 1) location.hash = `#/task/${encodeURIComponent(first.id)}/${encodeURIComponent(first.node)}`;
    else { $("tasks-node").value = ""; location.hash = "#/tasks"; }
  } catch (e) {
    $("dispatch-result").textContent = e.message;
    $("dispatch-result").className = "error";
  }
});

// --- routing -------------------------------------------------------------------------------------
function route() {
  showError("");
  if (state.jobTimer) { clearInterval(state.jobTimer); state.jobTimer = null; }
  if (state.output) { state.output.close(); state.output = null; state.detail = null; }
  const [, view, a, b] = (location.hash || "#/").split("/").map(decodeURIComponent);
  const name = !state.who ? "login" : (view || "fleet");
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== name;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.tab === name);
  const fail = (e) => showError(e.message);
  if (name === "fleet") loadNodes(false).catch(fail);
  else if (name === "tasks") loadTasks(false).catch(fail);
  else if (name === "task") showTask(a, b).catch(fail);
  else if (name === "jobs") loadJobs(false).catch(fail);
  else if (name === "job") showJob(a);
  else if (name === "dispatch" && !$("dispatch-form")) showError("your role may not dispatch");
}
window.addEventListener("hashchange", route);

if (state.token) login(state.token); else route();
