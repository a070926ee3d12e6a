// Tether's dashboard: the master's API over HTTPS and its WebSocket, with the same bearer
// token as any client. No build step, no outside network. Every value from the server is
// put into the page as text, never as markup.
"use strict";

const state = {
  token: null,
  ws: null,
  nextId: 1,
  edges: [],            // the last `edges` message
  modelVersion: null,
  systems: [],          // GET /api/v1/systems
  status: {},           // "sys/Name/index" -> {key: value}
  audit: new Map(),     // seq -> record
  rtt: {},              // edge -> [rtt_ms or null, ...], one per edges message
  pending: {},          // exec id -> callback
};
const RTT_POINTS = 120;
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b"];

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// ---- the token: from the address (#token=...), then kept for this tab only ----------

function takeToken() {
  const match = location.hash.match(/token=([^&]+)/);
  if (match) {
    sessionStorage.setItem("tether-token", decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname);
  }
  return sessionStorage.getItem("tether-token");
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: { "Authorization": "Bearer " + state.token, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = { message: text }; }
  if (!response.ok) {
    const err = new Error((data && (data.message || data.error)) || response.statusText);
    err.status = response.status;
    throw err;
  }
  return data;
}

// ---- the WebSocket ----------------------------------------------------------------------

function connect() {
  const url = `wss://${location.host}/api/v1/ws?access_token=${encodeURIComponent(state.token)}`;
  const ws = new WebSocket(url);
  state.ws = ws;
  ws.onopen = () => {
    setConnection(true);
    send({ cmd: "watch", topic: "edges" });
    send({ cmd: "watch", topic: "audit" });
    loadSystems();
  };
  ws.onmessage = (event) => onMessage(JSON.parse(event.data));
  ws.onclose = () => {
    setConnection(false);
    state.ws = null;
    setTimeout(connect, 2000);
  };
}

function send(command) {
  const id = state.nextId++;
  if (state.ws && state.ws.readyState === WebSocket.OPEN) {
    state.ws.send(JSON.stringify({ id, ...command }));
  }
  return id;
}

function setConnection(up) {
  const badge = $("connection");
  badge.textContent = up ? "live" : "reconnecting";
  badge.className = "badge " + (up ? "on" : "off");
}

function onMessage(message) {
  switch (message.type) {
    case "edges":
      state.edges = message.edges;
      if (state.modelVersion !== null && message.model_version !== state.modelVersion) {
        loadSystems();
      }
      state.modelVersion = message.model_version;
      recordRtt(message.edges);
      renderEdges();
      renderSites();
      renderRtt();
      break;
    case "audit":
      for (const record of message.records) state.audit.set(record.seq, record);
      renderTimeline();
      break;
    case "notify": {
      const key = `${message.sys}/${message.mod}/${message.index}`;
      (state.status[key] ||= {})[message.key] = message.value;
      renderSites();
      break;
    }
    case "success":
    case "error": {
      const callback = state.pending[message.id];
      if (callback) {
        delete state.pending[message.id];
        callback(message);
      }
      break;
    }
    default:
      break; // redirect hints and debug lines are not shown here
  }
}

// ---- data -----------------------------------------------------------------------------

async function loadSystems() {
  try {
    state.systems = await api("GET", "/api/v1/systems");
  } catch (err) {
    if (err.status === 401) return logout("the token is not valid");
    return;
  }
  for (const system of state.systems) {
    for (const member of system.members || []) {
      send({ cmd: "bind", sys: system.id, mod: member.name, index: member.index });
    }
  }
  renderSites();
  renderExecChoices();
}

function recordRtt(edges) {
  for (const edge of edges) {
    const series = (state.rtt[edge.id] ||= []);
    series.push(edge.online && typeof edge.rtt_ms === "number" ? edge.rtt_ms : null);
    if (series.length > RTT_POINTS) series.shift();
  }
}

function ownerOf(edgeId) {
  const edge = state.edges.find((e) => e.id === edgeId);
  return edge ? edge.owner : null;
}

// ---- rendering ------------------------------------------------------------------------

function ago(time) {
  if (!time) return "never";
  const seconds = Math.max(0, Math.round((Date.now() - Date.parse(time)) / 1000));
  return seconds < 2 ? "now" : `${seconds} s ago`;
}

function ownerBadge(owner) {
  return el("span", { class: `owner owner-${owner}` }, owner);
}

// A site pair's node, drawn under its location: its link, its role, its array slot.
function nodeRow(edge, node) {
  const slot = Array.isArray(node.array_slot) ? `array slot ${node.array_slot[0] + 1} of ${node.array_slot[1]}` : "array slot –";
  return el("tr", { class: "node", "data-node": node.id, "data-location": edge.id },
    el("td", { class: "id" }, "↳ ", node.id),
    el("td", {}, "node"),
    el("td", { class: "online" },
      el("span", { class: "badge " + (node.online ? "on" : "off") }, node.online ? "online" : "offline")),
    el("td", { class: "role" }, el("span", { class: `role role-${node.role}` }, node.role)),
    el("td", {}, slot),
    el("td", {}, typeof node.rtt_ms === "number" && node.online ? `${node.rtt_ms.toFixed(2)} ms` : "–"),
    el("td", {}, ago(node.last_seen)),
    el("td", {}, ""),
    el("td", {}, ""),
    el("td", {}, ""));
}

function renderEdges() {
  const body = $("edges").tBodies[0];
  body.replaceChildren(...state.edges.flatMap((edge) => {
    const restore = el("button", { type: "button", textContent: "Restore" });
    restore.disabled = !(edge.owner === "master" && edge.online);
    restore.title = restore.disabled
      ? "a restore gives control back to a connected edge the master controls"
      : `stop the master's modules of ${edge.id} and hand them back`;
    restore.onclick = () => restoreEdge(edge.id);
    const row = el("tr", { "data-edge": edge.id },
      el("td", { class: "id" }, edge.id),
      el("td", {}, edge.name || ""),
      el("td", { class: "online" },
        el("span", { class: "badge " + (edge.online ? "on" : "off") }, edge.online ? "online" : "offline")),
      el("td", { class: "owner-cell" }, ownerBadge(edge.owner)),
      el("td", { class: "epoch" }, edge.epoch),
      el("td", {}, typeof edge.rtt_ms === "number" && edge.online ? `${edge.rtt_ms.toFixed(2)} ms` : "–"),
      el("td", {}, ago(edge.last_seen)),
      el("td", {}, edge.standby || ""),
      el("td", { title: edge.commit || "" }, (edge.commit || "–").slice(0, 12)),
      el("td", {}, restore));
    return [row, ...(edge.nodes || []).map((node) => nodeRow(edge, node))];
  }));
}

// The masters (one, or those of a cluster) with what each holds: read every few seconds.
async function loadMasters() {
  let masters;
  try {
    masters = await api("GET", "/api/v1/masters");
  } catch (err) {
    return;
  }
  const list = (items) => (items && items.length ? items.join(", ") : "–");
  $("masters").tBodies[0].replaceChildren(...masters.map((master) =>
    el("tr", { "data-master": master.id },
      el("td", { class: "id" }, master.id),
      el("td", {}, master.api_url || "–"),
      el("td", {}, el("span", { class: "badge " + (master.alive ? "on" : "off") }, master.alive ? "alive" : "gone")),
      el("td", { class: "edges" }, list(master.edges)),
      el("td", { class: "units" }, list(master.units)),
      el("td", { class: "lease" },
        master.lease_age_ms == null ? "–" : `${Math.floor(master.lease_age_ms / 1000)} s`))));
}

async function restoreEdge(id) {
  const note = $("restore-result");
  note.textContent = `restoring ${id} ...`;
  try {
    const answer = await api("POST", `/api/v1/edges/${encodeURIComponent(id)}/restore`);
    note.textContent = `${id}: owner ${answer.owner}, epoch ${answer.epoch}`;
  } catch (err) {
    note.textContent = `${id}: ${err.message}`;
  }
}

function formatValue(value) {
  return typeof value === "string" ? value : JSON.stringify(value);
}

function renderSites() {
  const byEdge = new Map();
  for (const system of state.systems) {
    const edge = system.edge || "";
    if (!byEdge.has(edge)) byEdge.set(edge, []);
    byEdge.get(edge).push(system);
  }
  const sites = [...byEdge.entries()].map(([edgeId, systems]) => {
    const edge = state.edges.find((e) => e.id === edgeId);
    const owner = edgeId ? ownerOf(edgeId) : "master";
    const title = edgeId ? `${edgeId}${edge && edge.name ? " — " + edge.name : ""}` : "The master's own systems";
    return el("div", { class: "site", "data-site": edgeId || "master" },
      el("h3", {}, title, " ", owner ? el("span", {}, "run by ", ownerBadge(owner)) : null),
      ...systems.map((system) => renderRoom(system)));
  });
  $("sites").replaceChildren(...sites);
}

function renderRoom(system) {
  const rows = (system.members || []).map((member) => {
    const status = state.status[`${system.id}/${member.name}/${member.index}`] || {};
    const connected = "connected" in status
      ? el("span", { class: status.connected ? "yes" : "no" }, status.connected ? "yes" : "no")
      : "–";
    const keys = Object.entries(status)
      .filter(([key]) => key !== "connected")
      .map(([key, value]) => `${key}: ${formatValue(value)}`)
      .join(", ");
    return el("tr", { "data-module": `${member.name}/${member.index}` },
      el("td", {}, `${member.name} ${member.index}`),
      el("td", {}, member.driver),
      el("td", { class: "connected" }, connected),
      el("td", { class: "status" }, keys || "–"));
  });
  return el("div", { class: "room", "data-system": system.id },
    el("strong", {}, system.name || system.id), " ", el("span", { class: "note" }, system.id),
    el("table", {},
      el("thead", {}, el("tr", {}, el("th", {}, "Module"), el("th", {}, "Driver"),
        el("th", {}, "Connected"), el("th", {}, "Status"))),
      el("tbody", {}, ...rows)));
}

function renderTimeline() {
  const records = [...state.audit.values()].sort((a, b) => b.seq - a.seq);
  $("timeline").replaceChildren(...records.map((record) => {
    const line = record.event === "code"
      ? el("span", {}, `driver code of ${record.repository}: ${record.reason}`)
      : el("span", {}, `${record.edge}: `, ownerBadge(record.from), " → ", ownerBadge(record.to),
          ` epoch ${record.epoch} — ${record.reason}`);
    return el("li", { "data-seq": record.seq, "data-edge": record.edge || "", "data-to": record.to || "" },
      el("span", { class: "time" }, new Date(record.time).toLocaleTimeString()), line);
  }));
}

function renderRtt() {
  const canvas = $("rtt");
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  const series = Object.entries(state.rtt);
  const values = series.flatMap(([, points]) => points.filter((v) => v !== null));
  const top = Math.max(1, ...values) * 1.2;
  const pad = 36;
  ctx.strokeStyle = "#d8dee4";
  ctx.fillStyle = "#5f6b76";
  ctx.font = "11px system-ui, sans-serif";
  for (let i = 0; i <= 4; i++) {
    const y = pad / 2 + (height - pad) * (i / 4);
    ctx.beginPath(); ctx.moveTo(pad, y); ctx.lineTo(width, y); ctx.stroke();
    ctx.fillText(`${(top * (1 - i / 4)).toFixed(1)}`, 2, y + 4);
  }
  ctx.fillText("ms", 2, height - 4);
  const legend = [];
  series.forEach(([edge, points], n) => {
    const color = COLORS[n % COLORS.length];
    ctx.strokeStyle = color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    let drawing = false;
    points.forEach((value, i) => {
      if (value === null) { drawing = false; return; }
      const x = pad + (width - pad) * (i / (RTT_POINTS - 1));
      const y = pad / 2 + (height - pad) * (1 - value / top);
      if (drawing) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      drawing = true;
    });
    ctx.stroke();
    const entry = el("span", {}, `● ${edge}`);
    entry.style.color = color;
    legend.push(entry);
  });
  $("rtt-legend").replaceChildren(...legend);
}

function renderExecChoices() {
  const systems = $("exec-system");
  const chosen = systems.value;
  systems.replaceChildren(...state.systems.map((s) => el("option", { value: s.id }, s.id)));
  if (chosen) systems.value = chosen;
  renderExecModules();
}

function renderExecModules() {
  const system = state.systems.find((s) => s.id === $("exec-system").value);
  const members = system ? system.members || [] : [];
  $("exec-module").replaceChildren(...members.map((m) =>
    el("option", { value: `${m.name}/${m.index}` }, `${m.name} ${m.index}`)));
}

function runMethod(event) {
  event.preventDefault();
  const out = $("exec-result");
  let args;
  try {
    args = JSON.parse($("exec-args").value || "[]");
    if (!Array.isArray(args)) throw new Error("the arguments must be a JSON array");
  } catch (err) {
    out.textContent = `bad arguments: ${err.message}`;
    return;
  }
  const [name, index] = $("exec-module").value.split("/");
  const started = performance.now();
  const id = send({ cmd: "exec", sys: $("exec-system").value, mod: name, index: Number(index),
    method: $("exec-method").value, args });
  out.textContent = "running ...";
  state.pending[id] = (answer) => {
    const took = (performance.now() - started).toFixed(1);
    out.textContent = answer.type === "success"
      ? `result ${formatValue(answer.result)}, executed by ${answer.executed_by} (${took} ms)`
      : `${answer.code}: ${answer.message}`;
  };
}

// ---- start ----------------------------------------------------------------------------

function logout(reason) {
  sessionStorage.removeItem("tether-token");
  state.token = null;
  if (state.ws) { state.ws.onclose = null; state.ws.close(); }
  $("main").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = reason || "";
}

async function start(token) {
  state.token = token;
  try {
    const health = await api("GET", "/api/v1/health");
    $("server").textContent = `${health.role} ${health.id || ""} · ${location.host}`;
    await api("GET", "/api/v1/edges");
  } catch (err) {
    return logout(err.status === 401 ? "the token is not valid" : err.message);
  }
  $("login").hidden = true;
  $("main").hidden = false;
  connect();
  // "last seen" ages even when nothing new arrives.
  setInterval(renderEdges, 1000);
  loadMasters();
  setInterval(loadMasters, 2000);
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").onsubmit = (event) => {
    event.preventDefault();
    sessionStorage.setItem("tether-token", $("token").value.trim());
    start($("token").value.trim());
  };
  $("exec").onsubmit = runMethod;
  $("exec-system").onchange = renderExecModules;
  const token = takeToken();
  if (token) start(token); else logout();
});
