// The fleet page: polls /api/status every two seconds (304 when nothing changed) and renders it.
// Everything a strategy or a host can write is shown as text (textContent), never as markup.
"use strict";

const PAGE_SIZE = 100;
const POLL_MS = 2000;
const state = { etag: null, report: null, offset: 0, filter: "", eventsFor: null, snapshotAt: null,
  asked: 0, logFor: null, logShown: null, logAsked: 0 };
// Strategy statuses, in the order the summary counts them (others follow).
const STATUS_ORDER = ["running", "paused", "pending", "queued", "error", "stopped"];

// A token given as #token=… stays in this tab (never sent in a URL, never in the server's logs).
(function takeToken() {
  const match = location.hash.match(/token=([^&]+)/);
  if (match) {
    let token = match[1];
    try { token = decodeURIComponent(token); } catch (error) { /* a stray % : take it as written */ }
    sessionStorage.setItem("quantlab-token", token);
    history.replaceState(null, "", location.pathname);
  }
})();

function headers(extra) {
  const token = sessionStorage.getItem("quantlab-token");
  return Object.assign(token ? { Authorization: "Bearer " + token } : {}, extra || {});
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "on") for (const [ev, fn] of Object.entries(value)) node.addEventListener(ev, fn);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

function age(ms) {
  if (ms === null || ms === undefined) return "–";
  const s = ms / 1000;
  if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s";
  if (s < 3600) return Math.floor(s / 60) + " m " + Math.floor(s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " m";
}

function seconds(value) {
  return value === null || value === undefined ? "–" : age(value * 1000);
}

function badge(status, title, text) {
  return el("span", Object.assign({ class: "badge s-" + String(status) }, title ? { title } : {}),
    text === undefined ? String(status) : text);
}

async function poll() {
  const params = new URLSearchParams({ offset: String(state.offset), limit: String(PAGE_SIZE) });
  if (state.filter) params.set("q", state.filter);
  // Answers may arrive out of order (a filter typed while a poll is under way): only the last asked is shown.
  const asked = ++state.asked;
  try {
    const extra = state.etag && !state.filter ? { "If-None-Match": state.etag } : {};
    const answer = await fetch("/api/status?" + params, { headers: headers(extra), cache: "no-store" });
    if (answer.status === 304 || asked !== state.asked) return;
    if (!answer.ok) {
      document.getElementById("summary").textContent = "the server answered " + answer.status + ": " +
        (await answer.text()).slice(0, 300);
      return;
    }
    const etag = answer.headers.get("ETag");
    const report = await answer.json();
    if (asked !== state.asked) return;
    state.etag = etag;
    state.report = report;
    render(state.report);
    loadEvents();
  } catch (error) {
    document.getElementById("summary").textContent = "cannot reach quantlab serve: " + error;
  }
}

function render(report) {
  const strategies = report.strategies || [];
  const workers = report.workers || [];
  const online = workers.filter((w) => w.status === "idle" || w.status === "busy").length;
  // The whole fleet's counts, whatever the filter and the page show.
  const counts = report.counts || {};
  const known = STATUS_ORDER.filter((k) => counts[k]).concat(Object.keys(counts).filter((k) => !STATUS_ORDER.includes(k)));
  const split = known.map((k) => `${counts[k]} ${k}`).join(", ");
  const fleetTotal = report.page.fleet;
  document.getElementById("summary").textContent =
    `${fleetTotal} ${fleetTotal === 1 ? "strategy" : "strategies"}` + (split ? ` (${split})` : "") +
    ` · ${workers.length} workers (${online} online)`;
  renderHeld(report.suspended || {});
  renderLoop(report.loop);
  const leader = report.leader;
  document.getElementById("leader").textContent = leader
    ? `leader: ${leader.holder} · term ${leader.term}` + (leader.since ? ` · since ${new Date(leader.since).toLocaleString()}` : "")
    : "";
  state.snapshotAt = report.snapshot && report.snapshot.at;
  renderRound();
  const problems = document.getElementById("problems");
  problems.hidden = !(report.problems && report.problems.length);
  problems.textContent = (report.problems || []).join("\n");
  renderWorkers(workers);
  renderStrategies(strategies, report.page);
}

// A suspension (`quantlab suspend`) or the emergency brake (`quantlab stop-all`) is what an operator
// most needs to know: it says why nothing moves. Shown above everything else, until `resume`.
function renderHeld(suspended) {
  const box = document.getElementById("held");
  const entries = Object.entries(suspended).sort(([a], [b]) => (a === "*" ? -1 : b === "*" ? 1 : a.localeCompare(b)));
  box.replaceChildren(...entries.map(([target, hold]) =>
    el("div", { class: hold.stopAll ? "stopall" : "suspended", "data-target": target }, holdText(target, hold))));
  box.hidden = entries.length === 0;
}

function holdText(target, hold) {
  const who = [hold.by ? `by ${hold.by}` : null, hold.at ? `at ${new Date(hold.at).toLocaleString()}` : null]
    .filter(Boolean).join(" ");
  const why = hold.reason ? ` (${hold.reason})` : "";
  if (hold.stopAll) {
    return `STOP-ALL ${who}${why}: every strategy it reached was stopped and no lease is renewed, so the ` +
      "others stop when their lease runs out; nothing starts again until `quantlab resume`";
  }
  const what = target === "*" ? "everything" : target;
  return `SUSPENDED ${what} ${who}${why}: nothing starts, stops or moves ${target === "*" ? "" : "there "}` +
    "until `quantlab resume`; leases are renewed";
}

// The hold that covers a strategy or a worker by name (the fleet-wide one is in the banner), or null.
function suspension(id) {
  const suspended = (state.report && state.report.suspended) || {};
  const hold = suspended[id];
  if (!hold) return null;
  return holdText(id, hold);
}

function renderLoop(loop) {
  const line = document.getElementById("loop");
  if (!loop || !loop.kind) {
    line.textContent = "reconcile loop: none has applied this state yet";
    return;
  }
  const since = loop.at ? ` (since ${new Date(loop.at).toLocaleString()})` : "";
  line.textContent = `reconcile loop applies ${loopSource(loop)} · synced revision ${loop.revision ? String(loop.revision).slice(0, 12) : "–"}${since}`;
}

function loopSource(loop) {
  switch (loop.kind) {
    case "directory": return "the fleet directory (not in git)";
    case "working-tree": return "the working tree";
    case "commits": return loop.ref === "HEAD" ? "the commit checked out (detached HEAD)" : `the commits of ${loop.ref}`;
    case "upstream": return `the commits of ${loop.ref} (pulled)`;
    default: return String(loop.kind);
  }
}

// A cordoned or draining worker takes nothing new: it must not look like a green, idle one.
function workerBadges(w) {
  const online = w.status === "idle" || w.status === "busy";
  const hold = w.drain ? "draining" : (w.cordoned ? "cordoned" : null);
  if (!hold) return [badge(w.status)];
  const title = `${w.status}; ` + (w.drain ? "its strategies move away one at a time, nothing new is placed here"
    : "nothing new is placed here");
  return online ? [badge(hold, title)] : [badge(w.status), " ", badge(hold, title)];
}

const LOAD_MEANS = "The host's 1-minute load average divided by its cores: 1.00 means every core is busy; " +
  "above that, processes wait for a CPU.";

function loadText(w) {
  const perCore = `load ${w.cpu.toFixed(2)} per core`;
  if (!w.cpus) return `${perCore} (1-min load average ÷ cores)`;
  return `${perCore} (1-min load average ${(w.cpu * w.cpus).toFixed(2)} on ${w.cpus} core${w.cpus === 1 ? "" : "s"})`;
}

// What the hosts last said of a strategy whose worker does not answer is not news: not a green "running".
function strategyBadge(s) {
  const silent = s.workerStatus === "offline" || s.workerStatus === "unreachable";
  if (silent && (s.status === "running" || s.status === "paused")) {
    return badge("unconfirmed", `last known ${s.status} on ${s.workerId}, which is ${s.workerStatus}`,
      `${s.status}? (worker ${s.workerStatus})`);
  }
  return badge(s.status);
}

function renderRound() {
  const snap = state.report && state.report.snapshot;
  if (!snap) return;
  const rounds = snap.rounds || {};
  const parts = Object.entries(rounds).filter(([, r]) => r.seconds !== undefined)
    .map(([kind, r]) => `${kind} round ${r.seconds.toFixed(2)} s`);
  document.getElementById("round").textContent =
    `last round ${age(Date.now() - snap.at)} ago` + (parts.length ? " · " + parts.join(" · ") : "");
}

function renderWorkers(workers) {
  const byRegion = new Map();
  for (const w of workers) {
    const region = w.region || "no region";
    if (!byRegion.has(region)) byRegion.set(region, []);
    byRegion.get(region).push(w);
  }
  const box = document.getElementById("regions");
  box.replaceChildren();
  for (const [region, list] of [...byRegion.entries()].sort()) {
    const cards = el("div", { class: "cards" });
    for (const w of list) {
      const used = (w.runningStrategies || []).length;
      const share = w.maxStrategies ? Math.min(100, (100 * used) / w.maxStrategies) : 0;
      const fill = el("div");
      fill.style.width = `${share.toFixed(0)}%`;        // a property, not a style attribute (CSP)
      const bar = el("div", { class: "bar" }, fill);
      const held = suspension(w.id);
      cards.appendChild(el("div", { class: "card", "data-worker": w.id },
        el("div", { class: "id" }, w.id), ...workerBadges(w),
        held ? badge("suspended", held) : null, bar,
        el("div", { class: "muted" }, `${used}/${w.maxStrategies} strategies` + (w.memory != null ? ` · ${w.memory} MB free` : "")),
        w.cpu != null ? el("div", { class: w.cpu > 1 ? "load hot" : "load muted", title: LOAD_MEANS }, loadText(w)) : null,
        w.proxy ? el("div", { class: "muted proxy" }, `proxy ${w.proxy}`) : null,
        w.cordoned || w.drain ? el("div", { class: "muted" }, w.drain
          ? "draining: its strategies move away one at a time; nothing new is placed here"
          : "cordoned: nothing new is placed here") : null,
        el("div", { class: "muted" }, w.clockSkewMs !== null && w.clockSkewMs !== undefined
          ? `clock skew ${w.clockSkewMs} ms` : (w.error || ""))));
    }
    box.appendChild(el("div", { class: "region" }, el("h3", {}, region), cards));
  }
}

function renderStrategies(strategies, page) {
  const body = document.querySelector("#strategies tbody");
  body.replaceChildren();
  for (const s of strategies) {
    const why = s.plan ? `${s.plan.kind}: ${s.plan.reason}` : (s.reason || s.lastError || "");
    const link = el("a", { class: "sid", on: { click: () => showStrategy(s.id) } }, s.id);
    const held = suspension(s.id) || (s.workerId ? suspension(s.workerId) : null);
    body.appendChild(el("tr", { "data-strategy": s.id },
      el("td", { "data-col": "strategy" }, link),
      el("td", { "data-col": "status" }, strategyBadge(s), held ? " " : null, held ? badge("suspended", held) : null),
      el("td", { "data-col": "worker" }, s.workerId || "–"),
      el("td", { "data-col": "heartbeat" }, age(s.heartbeatAgeMs)),
      el("td", { "data-col": "errors" }, String(s.errorCount ?? "–")),
      el("td", { "data-col": "restarts" }, String(s.restarts ?? "–")),
      el("td", { "data-col": "revision" }, (s.revision || "–").slice(0, 12)),
      el("td", { "data-col": "lease" }, seconds(s.leaseLeftSeconds)),
      el("td", { "data-col": "checkpoint" }, seconds(s.checkpointAgeSeconds)),
      el("td", { "data-col": "proxy", class: "proxy" }, s.proxy || "–"),
      el("td", { "data-col": "why", class: "why" }, why)));
  }
  const last = Math.min(page.total, page.offset + strategies.length);
  const fleetTotal = page.fleet;
  // A filter narrows what is listed, never what the fleet holds: say both.
  document.getElementById("count").textContent = state.filter
    ? `(${page.total} of ${fleetTotal} match “${state.filter}”)` : `(${fleetTotal})`;
  document.getElementById("pageinfo").textContent = page.total ? `${page.offset + 1}–${last} of ${page.total}`
    : (state.filter ? "no strategy matches the filter" : "none");
  document.getElementById("prev").disabled = page.offset === 0;
  document.getElementById("next").disabled = last >= page.total;
}

async function loadEvents() {
  const params = new URLSearchParams({ limit: "100" });
  if (state.eventsFor) params.set("strategy", state.eventsFor);
  const answer = await fetch("/api/events?" + params, { headers: headers(), cache: "no-store" });
  if (!answer.ok) return;
  const events = await answer.json();
  const list = document.getElementById("events");
  list.replaceChildren();
  for (const e of events.reverse()) {
    const when = new Date(e.t || 0).toLocaleTimeString();
    const what = [e.event, e.strategy, e.worker || e.to, e.outcome, e.detail || e.reason || e.message]
      .filter(Boolean).join(" · ");
    list.appendChild(el("li", {}, `${when} ${what}` + (e.actor ? ` (${e.actor})` : "")));
  }
  document.getElementById("eventsfor").textContent = state.eventsFor ? "of " + state.eventsFor : "";
  document.getElementById("eventsall").hidden = !state.eventsFor;
}

async function showStrategy(id) {
  state.eventsFor = id;
  loadEvents();
  document.getElementById("logpanel").hidden = false;
  document.getElementById("logid").textContent = id;
  state.logFor = id;
  if (state.logShown !== id) {
    state.logShown = null;
    document.getElementById("log").textContent = "fetching from its worker…";
  }
  await fetchLog();
}

// The log opens at its newest lines, and a refresh keeps following them, unless the reader has
// scrolled up to older ones: then the view stays where they are reading.
async function fetchLog() {
  const id = state.logFor;
  if (!id) return;
  const asked = ++state.logAsked;
  const note = document.getElementById("lognote");
  note.textContent = "fetching…";
  let ok = false;
  let text;
  try {
    const answer = await fetch("/api/logs/" + encodeURIComponent(id) + "?lines=200", { headers: headers(), cache: "no-store" });
    ok = answer.ok;
    text = ok ? await answer.text() : `(${answer.status}) ${await answer.text()}`;
  } catch (error) {
    text = "cannot reach quantlab serve: " + error;
  }
  if (asked !== state.logAsked) return;          // a newer fetch (perhaps of another strategy) answers instead
  const log = document.getElementById("log");
  if (!ok && state.logShown === id) {           // the lines shown stay; say why they were not refreshed
    note.textContent = text.trim();
    return;
  }
  const following = log.scrollHeight - log.scrollTop - log.clientHeight < 16;
  const kept = log.scrollTop;
  log.textContent = ok && !text ? "(no lines yet)" : text;
  log.scrollTop = following ? log.scrollHeight : kept;
  state.logShown = ok ? id : null;
  note.textContent = ok ? `fetched at ${new Date().toLocaleTimeString()}` : "";
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("filter").addEventListener("input", (event) => {
    state.filter = event.target.value.trim();
    state.offset = 0;
    state.etag = null;
    poll();
  });
  document.getElementById("prev").addEventListener("click", () => {
    state.offset = Math.max(0, state.offset - PAGE_SIZE); state.etag = null; poll();
  });
  document.getElementById("next").addEventListener("click", () => {
    state.offset += PAGE_SIZE; state.etag = null; poll();
  });
  document.getElementById("logclose").addEventListener("click", () => {
    document.getElementById("logpanel").hidden = true;
    state.logFor = state.logShown = null;
    state.logAsked += 1;                          // an answer still on its way is not shown
  });
  document.getElementById("logrefresh").addEventListener("click", () => fetchLog());
  document.getElementById("eventsall").addEventListener("click", () => { state.eventsFor = null; loadEvents(); });
  poll();
  setInterval(poll, POLL_MS);
  setInterval(renderRound, 1000);
});
