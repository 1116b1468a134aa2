// The fleet page: polls /api/status every two seconds (304 when nothing changed) and renders it.
// Everything a strategy or a host can write is shown as text (textContent), never as markup.
"use strict";

const PAGE_SIZE = 100;
const POLL_MS = 2000;
const state = { etag: null, report: null, offset: 0, filter: "", eventsFor: null, snapshotAt: null };

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

function badge(status) {
  return el("span", { class: "badge s-" + String(status) }, String(status));
}

async function poll() {
  const params = new URLSearchParams({ offset: String(state.offset), limit: String(PAGE_SIZE) });
  if (state.filter) params.set("q", state.filter);
  try {
    const extra = state.etag && !state.filter ? { "If-None-Match": state.etag } : {};
    const answer = await fetch("/api/status?" + params, { headers: headers(extra), cache: "no-store" });
    if (answer.status === 304) return;
    if (!answer.ok) {
      document.getElementById("summary").textContent = "the server answered " + answer.status + ": " +
        (await answer.text()).slice(0, 300);
      return;
    }
    state.etag = answer.headers.get("ETag");
    state.report = await answer.json();
    render(state.report);
    loadEvents();
  } catch (error) {
    document.getElementById("summary").textContent = "cannot reach quantlab serve: " + error;
  }
}

function render(report) {
  const strategies = report.strategies || [];
  const workers = report.workers || [];
  const running = strategies.filter((s) => s.status === "running").length;
  const online = workers.filter((w) => w.status === "idle" || w.status === "busy").length;
  document.getElementById("summary").textContent =
    `${report.page.total} strategies · ${workers.length} workers (${online} online) · ${running} running on this page`;
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
      cards.appendChild(el("div", { class: "card", "data-worker": w.id },
        el("div", { class: "id" }, w.id), badge(w.status), bar,
        el("div", { class: "muted" }, `${used}/${w.maxStrategies} strategies` +
          (w.cpu !== null && w.cpu !== undefined ? ` · load ${(w.cpu * 100).toFixed(0)} %` : "")),
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
    body.appendChild(el("tr", { "data-strategy": s.id },
      el("td", {}, link), el("td", {}, badge(s.status)), el("td", {}, s.workerId || "–"),
      el("td", {}, age(s.heartbeatAgeMs)), el("td", {}, String(s.errorCount ?? "–")),
      el("td", {}, String(s.restarts ?? "–")), el("td", {}, (s.revision || "–").slice(0, 12)),
      el("td", {}, seconds(s.leaseLeftSeconds)), el("td", {}, seconds(s.checkpointAgeSeconds)),
      el("td", { class: "why" }, why)));
  }
  const last = Math.min(page.total, page.offset + strategies.length);
  document.getElementById("count").textContent = `(${page.total})`;
  document.getElementById("pageinfo").textContent = page.total ? `${page.offset + 1}–${last} of ${page.total}` : "none";
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
  const log = document.getElementById("log");
  log.textContent = "fetching from its worker…";
  const answer = await fetch("/api/logs/" + encodeURIComponent(id) + "?lines=200", { headers: headers() });
  log.textContent = answer.ok ? await answer.text() : `(${answer.status}) ${await answer.text()}`;
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
  });
  document.getElementById("eventsall").addEventListener("click", () => { state.eventsFor = null; loadEvents(); });
  poll();
  setInterval(poll, POLL_MS);
  setInterval(renderRound, 1000);
});
