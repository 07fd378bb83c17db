// edgerun console: plain JavaScript, no build step, no CDN. Everything a node sends
// (ids, facts, output) is put in the page with textContent, never as HTML.
"use strict";

const FINAL = new Set(["succeeded", "failed", "timed_out", "canceled", "rejected", "lost"]);
const BAD = new Set(["failed", "timed_out", "canceled", "rejected", "lost"]);
const STATES = ["queued", "dispatched", "accepted", "running", "succeeded", "failed",
  "timed_out", "canceled", "rejected", "lost"];
const OUTPUT_CAP = 256 * 1024;   // characters of output kept in the page per task
const TASK_ROWS_CAP = 500;       // rows kept in the live task list
const TARGETS_PAGE = 100;
const ROLLOUT_ROWS = 200;        // rollout targets shown at once (failures first)
const CONFIRM_OVER = 10;         // default: type the count to send to more nodes than this
const SVGNS = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
const state = { token: sessionStorage.getItem("edgerun-token"), who: null, stream: null,
  output: null, nodesNext: null, tasksNext: null, jobsNext: null, timer: null,
  jobCursors: [null], jobPage: 0, pending: null,
  fleetFilters: null, factPending: new Set(), factTimer: null, factBusy: false };

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
function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}
const stateCell = (s) => el("td", { class: "state s-" + s, "data-state": s }, s);
const isOperator = () => state.who && (state.who.role === "operator" || state.who.role === "admin");
const taskHref = (id, node) => `#/task/${encodeURIComponent(id)}/${encodeURIComponent(node)}`;
const link = (href, text) => el("a", { href }, text);

function showError(message) { $("error").textContent = message || ""; }
function announce(message) { $("announce").textContent = message; }

// --- times: relative, the UTC time on hover, the zone always said ----------------------
const utc = (t) => (t || "").replace("T", " ").slice(0, 19) + " UTC";
function ago(t, now) {
  const seconds = Math.round(((now || Date.now()) - Date.parse(t)) / 1000);
  const future = seconds < 0, s = Math.abs(seconds);
  const text = s < 10 ? "just now" : s < 60 ? `${s} s` : s < 3600 ? `${Math.floor(s / 60)} min`
    : s < 86400 ? `${Math.floor(s / 3600)} h` : `${Math.floor(s / 86400)} d`;
  return s < 10 ? text : future ? `in ${text}` : `${text} ago`;
}
function when(t) {
  if (!t) return "";
  return el("time", { datetime: t, title: utc(t), "data-rel": "1" }, ago(t));
}
function refreshTimes() {
  const now = Date.now();
  for (const node of document.querySelectorAll("time[data-rel]")) node.textContent = ago(node.getAttribute("datetime"), now);
}
setInterval(refreshTimes, 15000);

// --- the API ---------------------------------------------------------------------------
async function api(method, path, body, headers) {
  const response = await fetch("/v1" + path, {
    method, headers: { "Authorization": "Bearer " + state.token,
      ...(body ? { "Content-Type": "application/json" } : {}), ...(headers || {}) },
    body: body ? JSON.stringify(body) : undefined });
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) {
    const err = new Error((data && data.error) || ("HTTP " + response.status));
    err.status = response.status;
    err.code = data && data.code;
    err.field = data && data.field;
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

function newKey() {   // an Idempotency-Key: one per form submission
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

// The one place a live stream is opened and authenticated. The token never goes into a
// URL: each connection takes a single-use ticket (POST /v1/stream-tickets, token in the
// header). A used ticket cannot reconnect, so a stream the browser gave up on is opened
// again here with a fresh ticket, from the last event it saw (?last_event_id=).
// Returns an EventSource-like object: addEventListener(name, fn, options), close().
function eventStream(params) {
  const listeners = [];
  const stream = { source: null, closed: false, lastId: null, delay: 1000 };
  const attach = (source, [name, fn, options]) => source.addEventListener(name, (ev) => {
    if (ev.lastEventId) stream.lastId = ev.lastEventId;
    fn(ev);
  }, options);
  const again = () => {
    if (stream.closed) return;
    setTimeout(open, stream.delay);
    stream.delay = Math.min(2 * stream.delay, 15000);
  };
  async function open() {
    if (stream.closed) return;
    let ticket;
    try { ticket = (await api("POST", "/stream-tickets")).ticket; } catch (e) { again(); return; }
    if (stream.closed) return;
    const source = new EventSource("/v1/events" + query({ ...params, ticket, last_event_id: stream.lastId }));
    stream.source = source;
    for (const listener of listeners) attach(source, listener);
    source.addEventListener("open", () => { stream.delay = 1000; });
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED && stream.source === source) again();
    });
  }
  open();
  return {
    addEventListener(name, fn, options) {
      listeners.push([name, fn, options]);
      if (stream.source) attach(stream.source, [name, fn, options]);
    },
    close() { stream.closed = true; if (stream.source) stream.source.close(); },
  };
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
    if (!isOperator()) node.remove();   // a viewer gets no dispatch, cancel or rollout controls
  }
  openStream();
  if (!location.hash || location.hash === "#/login") location.hash = "#/overview";
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
  const source = eventStream({ channel: ["nodes", "tasks"] });
  state.stream = source;
  source.addEventListener("open", () => { $("live").textContent = "● live"; });
  source.addEventListener("error", () => { $("live").textContent = "○ reconnecting"; });
  source.addEventListener("node_event", (ev) => onNode(JSON.parse(ev.data).info));
  source.addEventListener("task_event", (ev) => onTask(JSON.parse(ev.data).task));
  source.addEventListener("reset", () => route());  // we missed events: read again
}

// --- overview ------------------------------------------------------------------------------
async function loadOverview() {
  const [o, series] = await Promise.all([api("GET", "/overview"), api("GET", "/overview/series")]);
  $("ov-online").textContent = o.nodes.online;
  $("ov-offline").textContent = o.nodes.offline;
  $("ov-lost").textContent = o.nodes.recently_lost;
  $("ov-lost").className = "big" + (o.nodes.recently_lost ? " s-lost" : "");
  $("ov-lost-list").replaceChildren(...o.nodes.lost.map((n) => el("li", {}, `${n.node} `, when(n.at))));
  $("ov-running").textContent = o.tasks.running;
  $("ov-queued").textContent = o.tasks.queued;
  $("ov-failed").textContent = o.tasks.failed_last_hour;
  $("ov-failed").className = "big" + (o.tasks.failed_last_hour ? " s-failed" : "");
  $("ov-failures").replaceChildren(...o.failures.map((f) => el("tr", { "data-task": f.id, "data-node": f.node },
    el("td", {}, link(taskHref(f.id, f.node), f.id)), el("td", {}, f.node), stateCell(f.state),
    el("td", {}, when(f.updated_at)), el("td", {}, f.error ? `${f.error.code}: ${f.error.message}` : ""))));
  if (!o.failures.length) $("ov-failures").append(el("tr", {}, el("td", { colspan: "5", class: "muted" }, "no failures")));
  $("ov-outcomes").replaceChildren(outcomeChart(series.outcomes));
  $("ov-online-chart").replaceChildren(onlineChart(series.online));
  $("overview").dataset.loaded = "1";
}

function chartFrame(label, max, first, last) {
  const frame = svg("svg", { viewBox: "0 0 600 150", role: "img", "aria-label": label,
    preserveAspectRatio: "none" }, svg("title", {}, label));
  frame.append(svg("text", { x: 2, y: 10, class: "axis" }, String(max)),
    svg("text", { x: 2, y: 148, class: "axis" }, first),
    svg("text", { x: 598, y: 148, class: "axis", "text-anchor": "end" }, last));
  return frame;
}

function outcomeChart(points) {
  const max = Math.max(1, ...points.map((p) => p.succeeded + p.failed + p.canceled));
  const total = points.reduce((a, p) => a + p.succeeded, 0);
  const bad = points.reduce((a, p) => a + p.failed + p.canceled, 0);
  const hhmm = (t) => t.slice(11, 16);
  const frame = chartFrame(`Task outcomes per minute: ${total} succeeded, ${bad} failed or canceled in the last hour`,
    max, hhmm(points[0].minute) + " UTC", hhmm(points[points.length - 1].minute) + " UTC");
  const w = 600 / points.length, h = 125;
  points.forEach((p, i) => {
    const ok = (h * p.succeeded) / max, no = (h * (p.failed + p.canceled)) / max;
    const tip = `${hhmm(p.minute)} UTC: ${p.succeeded} succeeded, ${p.failed} failed, ${p.canceled} canceled`;
    if (ok) frame.append(svg("rect", { x: i * w + 1, y: 135 - ok, width: w - 2, height: ok, class: "ok" }, svg("title", {}, tip)));
    if (no) frame.append(svg("rect", { x: i * w + 1, y: 135 - ok - no, width: w - 2, height: no, class: "bad" }, svg("title", {}, tip)));
  });
  frame.dataset.succeeded = total;
  frame.dataset.failed = bad;
  return frame;
}

function onlineChart(points) {
  const max = Math.max(1, ...points.map((p) => p.online));
  const last = points[points.length - 1];
  const frame = chartFrame(`Nodes online over 24 hours, now ${last.online}`, max,
    points[0].at.slice(5, 16).replace("T", " ") + " UTC", last.at.slice(5, 16).replace("T", " ") + " UTC");
  const step = 600 / Math.max(1, points.length - 1);
  const coords = points.map((p, i) => `${(i * step).toFixed(1)},${(135 - (125 * p.online) / max).toFixed(1)}`);
  frame.append(svg("polyline", { points: coords.join(" "), class: "line" }));
  frame.dataset.now = last.online;
  return frame;
}

// --- fleet -------------------------------------------------------------------------------
// The list shows the filters of its last successful read (state.fleetFilters); live events
// are judged by those, not by what is being typed. The fact filter is --where's language
// (dotted paths, globs, >=, list elements): the API judges it, here too, so the console
// has no second copy of it: a node event while one is set asks the API about that node.
const FACT_BATCH = 100;   // node ids per live check

function nodeFilters() {
  return { q: $("fleet-q").value.trim(), match: $("fleet-match").value.trim(),
    fact: $("fleet-fact").value.trim(), online: $("fleet-online").checked ? "1" : "" };
}

function nodeRow(n) {
  const f = n.facts || {};
  const ips = Object.values(f.ips || {}).flat().map((a) => String(a).split("/")[0])
    .filter((a) => !a.startsWith("127.") && !a.startsWith("fe80:") && a !== "::1");
  return el("tr", { "data-node": n.node },
    el("td", {}, n.node), stateCell(n.state), el("td", {}, when(n.last_seen)),
    el("td", {}, f.hostname || ""), el("td", {}, f.arch || ""), el("td", {}, f.cpus || ""),
    el("td", {}, ips.join(" ")), el("td", {}, n.agent || ""));
}

function fleetError(e) {
  const message = e ? e.message : "";
  $("fleet-error").textContent = message;
  if (e && e.field === "fact") $("fleet-fact").setAttribute("aria-invalid", "true");
  else $("fleet-fact").removeAttribute("aria-invalid");
}

async function loadNodes(more, given) {
  const filters = more ? state.fleetFilters || nodeFilters() : given || nodeFilters();
  const params = { ...filters, limit: 200, cursor: more ? state.nodesNext : null };
  const data = await api("GET", "/nodes" + query(params));
  if (!more) {
    $("nodes").replaceChildren();
    state.fleetFilters = filters;
    state.factPending.clear();
  }
  fleetError(null);
  for (const n of data.nodes) $("nodes").append(nodeRow(n));
  state.nodesNext = data.next;
  $("nodes-more").hidden = !data.next;
  state.nodesTotal = data.total;
  $("fleet-count").textContent = `${data.total} nodes`;
}

// search, glob and online only; the fact filter is the API's (factCheck)
function nodeVisible(n) {
  const f = state.fleetFilters || nodeFilters();
  if (f.online && n.state !== "online") return false;
  if (f.q && !(n.node + JSON.stringify(n.facts || {})).toLowerCase().includes(f.q.toLowerCase())) return false;
  if (f.match) {
    const re = new RegExp("^" + f.match.replace(/[.+^${}()|\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".") + "$");
    if (!re.test(n.node)) return false;
  }
  return true;
}

function placeNode(n, visible) {
  const existing = document.querySelector(`#nodes tr[data-node="${CSS.escape(n.node)}"]`);
  if (!visible) {
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

function onNode(n) {
  if (!n) return;
  const f = state.fleetFilters;
  if (!f || !f.fact) { placeNode(n, nodeVisible(n)); return; }
  if ($("fleet").hidden) return;   // opening the view reads the list again
  state.factPending.add(n.node);
  if (!state.factTimer && !state.factBusy) state.factTimer = setTimeout(factCheck, 100);
}

// one read for the nodes that changed: ?match=their ids&fact=the filter; the API's record
// (as new as the event, or newer) is the one shown; one read at a time, in event order
async function factCheck() {
  state.factTimer = null;
  const f = state.fleetFilters;
  const ids = [...state.factPending].slice(0, FACT_BATCH);
  ids.forEach((id) => state.factPending.delete(id));
  if (!ids.length || !f || !f.fact) return;
  state.factBusy = true;
  try {
    const data = await api("GET", "/nodes" + query({ match: ids, fact: f.fact, limit: 1000 }));
    if (state.fleetFilters !== f) return;   // the filter changed meanwhile: the new read has it
    const found = new Map(data.nodes.map((n) => [n.node, n]));
    for (const id of ids) {
      const n = found.get(id);
      placeNode(n || { node: id }, n !== undefined && nodeVisible(n));
    }
  } catch (e) {   // a node forgotten meanwhile (404) or the API away: read the list again
    if (state.fleetFilters === f) await loadNodes(false, f).catch(fleetError);
  } finally {
    state.factBusy = false;
    if (state.factPending.size && !state.factTimer) state.factTimer = setTimeout(factCheck, 100);
  }
}

$("fleet-filter").addEventListener("submit", (ev) => { ev.preventDefault(); loadNodes(false).catch(fleetError); });
$("nodes-more").addEventListener("click", () => loadNodes(true).catch(fleetError));

// --- tasks ---------------------------------------------------------------------------------
for (const s of STATES) {
  $("tasks-state").append(el("option", { value: s }, s));
  $("job-state").append(el("option", { value: s }, s));
}

// a row opens by its link (keyboard: Tab, Enter) or a click anywhere on it
function clickable(tr, href) {
  tr.classList.add("clickable");
  tr.addEventListener("click", (ev) => { if (!ev.target.closest("a")) location.hash = href; });
  return tr;
}

function taskRow(t) {
  const error = t.error ? `${t.error.code}: ${t.error.message}` : "";
  const href = taskHref(t.id, t.node);
  return clickable(el("tr", { "data-task": t.id, "data-node": t.node },
    el("td", {}, link(href, t.id)), el("td", {}, t.node), el("td", {}, t.type || ""), stateCell(t.state),
    el("td", {}, t.exit_code ?? ""), el("td", {}, when(t.updated_at)), el("td", {}, error)), href);
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
  if (state.detail && state.detail.id === t.id && state.detail.node === t.node) showTaskState(t);
  if ($("tasks").hidden) return;
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
    ["command", t.spec && (t.spec.command || t.spec.url)], ["created", when(t.created_at)],
    ["updated", when(t.updated_at)], ["timeout", t.timeout ? `${t.timeout} s` : null],
    ["job", t.job ? link("#/job/" + encodeURIComponent(t.job), t.job) : null]];
  $("task-fields").replaceChildren(...fields.filter(([, v]) => v !== null && v !== undefined && v !== "")
    .flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, Array.isArray(v) ? v.join(" ") : v)]));
}

function showUpdates(t) {
  $("task-updates").replaceChildren(...(t.updates || []).map((u) => el("li", {}, when(u.at), ` ${u.state}`)));
}

async function showTask(id, node) {
  if (state.output) { state.output.close(); state.output = null; }
  state.detail = { id, node };
  $("task-id").textContent = id;
  $("task-node").textContent = node;
  $("output").replaceChildren();
  $("output-note").textContent = "";
  // subscribe first, then read: no output falls between the two
  const source = eventStream({ channel: ["output", "tasks"], task: id, node });
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
  showUpdates(t);
  if (FINAL.has(t.state) && !live) showTails(t);
}

async function refreshDetail(id, node, tails) {
  const data = await api("GET", `/tasks/${encodeURIComponent(id)}` + query({ node }));
  const t = data.tasks[0];
  showUpdates(t);
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
    announce("cancel sent");
  } catch (e) { showError(e.message); }
});

// --- jobs: one aggregated row each, targets filtered and paged ---------------------------------
function bar(p) {
  const total = p.tasks || 1;
  const ok = (100 * p.succeeded) / total, bad = (100 * p.failed) / total;
  const okPart = el("span", { class: "ok" }), badPart = el("span", { class: "bad" });
  // through the CSSOM: the page's Content-Security-Policy allows no inline styles
  Object.assign(okPart.style, { left: "0", width: `${ok}%` });
  Object.assign(badPart.style, { left: `${ok}%`, width: `${bad}%` });
  return el("span", {}, el("span", { class: "bar", role: "img",
    "aria-label": `${p.succeeded} succeeded, ${p.failed} failed of ${p.tasks}` }, okPart, badPart),
    ` ${p.done}/${p.tasks} done, ${p.failed} failed`);
}

async function loadJobs(more) {
  const data = await api("GET", "/jobs" + query({ limit: 50, cursor: more ? state.jobsNext : null }));
  if (!more) $("job-rows").replaceChildren();
  for (const j of data.jobs) {
    const href = "#/job/" + encodeURIComponent(j.id);
    $("job-rows").append(clickable(el("tr", { "data-job": j.id },
      el("td", {}, link(href, j.id)), el("td", {}, when(j.created_at)), el("td", {}, j.nodes),
      el("td", {}, j.steps.length), el("td", { class: "progress" }, bar(j.progress))), href));
  }
  state.jobsNext = data.next;
  $("jobs-more").hidden = !data.next;
}
$("jobs-more").addEventListener("click", () => loadJobs(true).catch((e) => showError(e.message)));

const stepLabel = (spec, i) => spec.name || String(i + 1);
const what = (spec) => { const w = spec.command || spec.url || ""; return Array.isArray(w) ? w.join(" ") : w; };

async function refreshJob(id) {
  const cursor = state.jobCursors[state.jobPage];
  const data = await api("GET", `/jobs/${encodeURIComponent(id)}/tasks` +
    query({ state: $("job-state").value, limit: TARGETS_PAGE, cursor }));
  const job = data.job, p = job.progress;
  $("job-id").textContent = job.id;
  const about = [["name", job.name], ["created by", job.creator || "unknown (older than the audit log)"],
    ["created", when(job.created_at)], ["started", job.started_at ? when(job.started_at) : "not yet"],
    ["ended", job.ended_at ? when(job.ended_at) : "not yet"],
    ["shape", job.graph ? "graph" : job.steps.length > 1 ? "ordered steps" : "one step"]];
  $("job-about").replaceChildren(...about.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  $("job-summary").replaceChildren(`${job.nodes} nodes, ${p.tasks} tasks: `, bar(p));
  Object.assign($("job-summary").dataset, { done: p.done, failed: p.failed, tasks: p.tasks });
  $("job-steps").replaceChildren(...p.steps.map((s) => {
    const spec = job.steps[s.step] || {};
    const nodes = spec.nodes;
    const targets = nodes ? (nodes.length <= 5 ? nodes.join(" ") : `${nodes.length} nodes: ${nodes.slice(0, 3).join(" ")} …`)
      : `all ${job.nodes}`;
    const states = Object.entries(s.states).sort().map(([k, n]) => `${n} ${k}`).join(", ");
    return el("tr", { "data-step": stepLabel(spec, s.step) }, el("td", {}, stepLabel(spec, s.step)),
      el("td", {}, what(spec)), el("td", {}, (spec.needs || []).join(", ")), el("td", {}, targets),
      el("td", { class: "step-progress" }, `${s.done}/${s.tasks}`), el("td", {}, states));
  }));
  const cancel = $("job-cancel");
  if (cancel) cancel.hidden = p.done >= p.tasks;
  $("job-targets").replaceChildren(...data.tasks.map((t) => {
    const href = taskHref(t.id, t.node);
    const spec = job.steps[t.step] || {};
    return clickable(el("tr", { "data-node": t.node, "data-step": stepLabel(spec, t.step) },
      el("td", {}, link(href, t.node)), el("td", {}, stepLabel(spec, t.step)), stateCell(t.state),
      el("td", {}, t.exit_code ?? ""), el("td", {}, when(t.updated_at)),
      el("td", {}, t.error ? `${t.error.code}: ${t.error.message}` : "")), href);
  }));
  state.jobCursors[state.jobPage + 1] = data.next;
  $("job-next").disabled = !data.next;
  $("job-prev").disabled = state.jobPage === 0;
  $("job-page-note").textContent = `${data.total} shown by this filter; page ${state.jobPage + 1}, ${TARGETS_PAGE} a page`;
}

function showJob(id) {
  state.jobCursors = [null];
  state.jobPage = 0;
  const tick = () => refreshJob(id).catch((e) => showError(e.message));
  tick();
  state.timer = setInterval(tick, 1500);   // one aggregated read: cheap at any fleet size
}
$("job-next").addEventListener("click", () => { state.jobPage += 1; refreshJob($("job-id").textContent); });
$("job-prev").addEventListener("click", () => { state.jobPage = Math.max(0, state.jobPage - 1); refreshJob($("job-id").textContent); });
$("job-state").addEventListener("change", () => {
  state.jobCursors = [null]; state.jobPage = 0;
  refreshJob($("job-id").textContent).catch((e) => showError(e.message));
});
if ($("job-cancel")) $("job-cancel").addEventListener("click", async () => {
  try { await api("POST", `/jobs/${encodeURIComponent($("job-id").textContent)}/cancel`, {}); announce("cancel sent"); }
  catch (e) { showError(e.message); }
});

// --- rollouts: batches, the abort rule and its figures, pause / resume / abort ----------------
function shape(o) {
  const parts = [];
  if (o.batch) parts.push(`batches of ${o.batch} at once`);
  if (o.rate) parts.push(`${o.rate}/min`);
  return parts.join(", ") || "all at once";
}
function abortRule(o) {
  if (o.abort_count) return `abort after ${o.abort_count} failed`;
  if (o.abort_percent) return `abort at ${o.abort_percent}% failed, once ${o.abort_min} finished`;
  return "none";
}

async function loadRollouts() {
  const data = await api("GET", "/rollouts");
  $("rollout-rows").replaceChildren(...data.rollouts.map((r) => {
    const href = "#/rollout/" + encodeURIComponent(r.id);
    return clickable(el("tr", { "data-rollout": r.id }, el("td", {}, link(href, r.id)), stateCell(r.state),
      el("td", {}, when(r.created_at)), el("td", {}, r.nodes.length), el("td", {}, shape(r.options)),
      el("td", {}, r.reason || "")), href);
  }));
  if (!data.rollouts.length) $("rollout-rows").append(el("tr", {}, el("td", { colspan: "6", class: "muted" }, "no rollouts")));
}

const FAILED_PHASE = (phase) => !["pending", "active", "succeeded", "skipped"].includes(phase);

async function refreshRollout(id) {
  const r = await api("GET", "/rollouts/" + encodeURIComponent(id));
  const c = r.counts, o = r.options;
  $("rollout-id").textContent = r.id;
  $("rollout-state").textContent = r.state;
  $("rollout-state").className = "state s-" + r.state;
  $("rollout-state").dataset.state = r.state;
  const share = c.finished ? Math.round((100 * c.failed) / c.finished) : 0;
  const figures = o.abort_count ? `${c.failed} of ${o.abort_count} allowed failures`
    : o.abort_percent ? `${c.failed} of ${c.finished} finished failed (${share}%; limit ${o.abort_percent}% from ${o.abort_min} finished)`
      : `${c.failed} failed`;
  const about = [["task", link(taskHref(r.task_id, (r.targets[0] || {}).node || ""), r.task_id)],
    ["created", when(r.created_at)], ["batches", shape(o)], ["abort rule", abortRule(o)],
    ["now", figures], ["reason", r.reason]];
  $("rollout-about").replaceChildren(...about.filter(([, v]) => v).flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  $("rollout-summary").replaceChildren(`${c.total} targets: ${c.pending} pending, ${c.active} active, ` +
    `${c.succeeded} succeeded, ${c.failed} failed, ${c.skipped} skipped`);
  Object.assign($("rollout-summary").dataset, { total: c.total, failed: c.failed, succeeded: c.succeeded });
  if ($("rollout-pause")) {
    $("rollout-pause").hidden = r.state !== "running";
    $("rollout-resume").hidden = r.state !== "paused";
    $("rollout-abort").hidden = !["running", "paused"].includes(r.state);
  }
  const phase = $("rollout-phase").value;
  const rows = r.targets.filter((t) => !phase || (phase === "failed" ? FAILED_PHASE(t.phase) : t.phase === phase))
    .sort((a, b) => FAILED_PHASE(b.phase) - FAILED_PHASE(a.phase));
  $("rollout-targets").replaceChildren(...rows.slice(0, ROLLOUT_ROWS).map((t) => {
    const href = taskHref(t.task, t.node);
    return clickable(el("tr", { "data-node": t.node }, el("td", {}, link(href, t.node)), stateCell(t.phase),
      el("td", {}, t.task), el("td", {}, t.attempts), el("td", {}, t.error ? `${t.error.code}: ${t.error.message}` : "")), href);
  }));
  if (rows.length > ROLLOUT_ROWS) $("rollout-targets").append(el("tr", {}, el("td", { colspan: "5", class: "muted" },
    `${rows.length - ROLLOUT_ROWS} more not shown; filter by phase`)));
}

function showRollout(id) {
  const tick = () => refreshRollout(id).catch((e) => showError(e.message));
  tick();
  state.timer = setInterval(tick, 1500);
}
$("rollout-phase").addEventListener("change", () => refreshRollout($("rollout-id").textContent).catch((e) => showError(e.message)));
for (const action of ["pause", "resume", "abort"]) {
  const button = $("rollout-" + action);
  if (!button) continue;
  button.addEventListener("click", async () => {
    const id = $("rollout-id").textContent;
    button.disabled = true;
    try {
      await api("POST", `/rollouts/${encodeURIComponent(id)}/${action}`, {});
      announce(`rollout ${action} done`);
      await refreshRollout(id);
    } catch (e) { showError(e.message); }
    finally { button.disabled = false; }
  });
}

// --- dispatch: only the chosen type's fields; count, confirm, send once ------------------------
function showTypeFields() {
  const type = $("d-type").value;
  for (const kind of ["shell", "download", "job"]) {
    for (const node of document.querySelectorAll(".for-" + kind)) node.hidden = kind !== type;
  }
}
if ($("d-type")) {
  $("d-type").addEventListener("change", showTypeFields);
  showTypeFields();
  const saved = Number(localStorage.getItem("edgerun-confirm-over"));
  if (saved > 0) $("d-confirm-over").value = saved;
  $("d-confirm-over").addEventListener("change", () => localStorage.setItem("edgerun-confirm-over", $("d-confirm-over").value));
}

function busy(on, text) {
  const submit = $("d-submit");
  submit.disabled = on;
  submit.setAttribute("aria-busy", on ? "true" : "false");
  submit.textContent = on ? (text || "Sending…") : "Dispatch";
  $("dispatch-form").setAttribute("aria-busy", on ? "true" : "false");
}

function readForm() {
  const targets = $("d-targets").value.split(/[\s,]+/).filter(Boolean);
  const online = $("d-online").checked;
  const timeout = Number($("d-timeout").value) || undefined;
  const type = $("d-type").value;
  const name = $("d-name").value.trim().replace(/[^A-Za-z0-9_.:-]+/g, "-").slice(0, 60);
  let steps;
  if (type === "job") {
    steps = $("d-steps").value.split("\n").map((c) => c.trim()).filter(Boolean)
      .map((command) => ({ type: "shell", command, timeout }));
  } else {
    steps = [type === "shell" ? { type, command: $("d-command").value, timeout }
      : { type, url: $("d-url").value, dest: $("d-dest").value, timeout,
        ...($("d-sha256").value ? { sha256: $("d-sha256").value } : {}) }];
  }
  return { targets, online, type, name, steps };
}

async function countTargets(form) {
  if (!form.targets.length && !form.online) return 0;
  const data = await api("GET", "/nodes" + query({ match: form.targets, online: form.online ? "1" : "", limit: 1 }));
  return data.total;
}

async function send(p) {
  const { form, key, count } = p;
  busy(true, `Sending to ${count} node${count === 1 ? "" : "s"}…`);
  try {
    // several nodes, or a job: one job with one aggregated progress row
    if (form.type === "job" || count > 1) {
      const id = (form.name ? form.name + "-" : "") + key.slice(0, 8);
      const job = await api("POST", "/jobs", { id, targets: form.targets, online: form.online, steps: form.steps },
        { "Idempotency-Key": key });
      state.pending = null;
      location.hash = "#/job/" + encodeURIComponent(job.id);
      return;
    }
    const data = await api("POST", "/tasks", { targets: form.targets, online: form.online, task: form.steps[0] },
      { "Idempotency-Key": key });
    state.pending = null;
    const first = data.tasks[0];
    location.hash = taskHref(first.id, first.node);
  } catch (e) {
    $("dispatch-result").textContent = e.message;
    $("dispatch-result").className = "error";
  } finally {
    busy(false);
  }
}

if ($("dispatch-form")) $("dispatch-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if ($("d-submit").disabled) return;   // already sending: a double click sends once
  $("dispatch-result").textContent = "";
  const form = readForm();
  busy(true, "Counting targets…");
  let count;
  try { count = await countTargets(form); }
  catch (e) { busy(false); $("dispatch-result").textContent = e.message; $("dispatch-result").className = "error"; return; }
  if (!count) {
    busy(false);
    $("dispatch-result").textContent = "no node matches these targets";
    $("dispatch-result").className = "error";
    return;
  }
  state.pending = { form, count, key: newKey() };   // one key for this submission
  const over = Number($("d-confirm-over").value) || CONFIRM_OVER;
  if (count > over) {
    busy(false);
    $("d-submit").disabled = true;
    $("d-confirm").hidden = false;
    $("d-confirm-text").textContent = `This sends to ${count} nodes. Type ${count} to confirm.`;
    $("d-confirm-count").value = "";
    $("d-confirm-count").focus();
    return;
  }
  await send(state.pending);
});

function closeConfirm() {
  $("d-confirm").hidden = true;
  $("d-submit").disabled = false;
}
if ($("d-confirm-go")) {
  $("d-confirm-go").addEventListener("click", async () => {
    const p = state.pending;
    if (!p || $("d-confirm-go").disabled) return;
    if ($("d-confirm-count").value.trim() !== String(p.count)) {
      $("d-confirm-text").textContent = `That is not ${p.count}. Type ${p.count} to send to ${p.count} nodes.`;
      return;
    }
    $("d-confirm-go").disabled = true;
    try { await send(p); } finally { $("d-confirm-go").disabled = false; closeConfirm(); }
  });
  $("d-confirm-count").addEventListener("keydown", (ev) => { if (ev.key === "Enter") { ev.preventDefault(); $("d-confirm-go").click(); } });
  $("d-confirm-back").addEventListener("click", () => { state.pending = null; closeConfirm(); });
}

// --- routing -------------------------------------------------------------------------------------
const TITLES = { overview: "Overview", fleet: "Fleet", tasks: "Tasks", task: "Task", jobs: "Jobs",
  job: "Job", rollouts: "Rollouts", rollout: "Rollout", dispatch: "Dispatch", login: "Log in" };

function route() {
  showError("");
  if (state.timer) { clearInterval(state.timer); state.timer = null; }
  if (state.output) { state.output.close(); state.output = null; state.detail = null; }
  const [, view, a, b] = (location.hash || "#/").split("/").map(decodeURIComponent);
  const name = !state.who ? "login" : (TITLES[view] ? view : "overview");
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== name;
  for (const item of document.querySelectorAll("nav a")) {
    const on = item.dataset.tab === name || item.dataset.tab + "s" === name || item.dataset.tab === name + "s";
    item.classList.toggle("active", on);
    if (on) item.setAttribute("aria-current", "page"); else item.removeAttribute("aria-current");
  }
  document.title = `${TITLES[name]} · edgerun console`;
  if (state.who) announce(`${TITLES[name]} view`);
  const fail = (e) => showError(e.message);
  if (name === "overview") {
    delete $("overview").dataset.loaded;   // set again once this visit's figures are in
    loadOverview().catch(fail);
    state.timer = setInterval(() => loadOverview().catch(fail), 10000);
  } else if (name === "fleet") loadNodes(false).catch(fleetError);
  else if (name === "tasks") loadTasks(false).catch(fail);
  else if (name === "task") showTask(a, b).catch(fail);
  else if (name === "jobs") loadJobs(false).catch(fail);
  else if (name === "job") showJob(a);
  else if (name === "rollouts") loadRollouts().catch(fail);
  else if (name === "rollout") showRollout(a);
  else if (name === "dispatch" && !$("dispatch-form")) showError("your role may not dispatch");
}
window.addEventListener("hashchange", route);

if (state.token) login(state.token); else route();
