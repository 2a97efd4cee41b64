// minivllm's live dashboard: reads /dashboard/events (server-sent events, read with fetch so
// that an API key travels in the Authorization header, never in a URL) and draws what the
// engines' step loops do: every engine in the engines table, the one picked in full. Event
// formats: ipc/PROTOCOL.md, "Dashboard events" (`engine`, with its data-parallel rank spliced
// in as `engine`) and minivllm/server/dashboard/hub.py (`server`).
"use strict";

const MAX_BARS = 240;        // steps in the timeline
const MAX_POINTS = 300;      // queue samples in the queue chart
const RATE_WINDOW_S = 3;     // throughput over this many seconds
const RETRY_MS = 1000;       // reconnect delay after the stream drops

const S = {
  key: sessionStorage.getItem("minivllm-api-key"),
  restarts: null, engineState: null, dirty: false,
  engines: [],  // per data-parallel rank: what its events said (see engine())
  view: 0,      // the engine drawn in full
  get steps() { return engine(S.view).steps; },
  get grid() { return engine(S.view).grid; },
};

function engine(rank) {
  return S.engines[rank] ||= { pid: null, seq: null, grid: null, steps: [], queues: [],
                               rates: [], live: [], last: null, tps: 0, state: "?" };
}

const $ = (id) => document.getElementById(id);
const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

function show(k, value) {
  for (const el of document.querySelectorAll(`[data-k="${k}"]`)) el.textContent = value;
}

function status(text, level) {
  const el = $("status");
  el.textContent = text;
  el.className = level;
}

// ---- the stream ------------------------------------------------------------------------------
async function connect() {
  const headers = S.key ? { Authorization: "Bearer " + S.key } : {};
  let resp;
  try {
    resp = await fetch("/dashboard/events", { headers, cache: "no-store" });
  } catch (err) {
    return retry("server unreachable: reconnecting…");
  }
  if (resp.status === 401) return askKey(S.key ? "wrong key" : "");
  if (!resp.ok) return retry(`server answered ${resp.status}: reconnecting…`);
  $("keyform").hidden = true;
  status("connected", "ok");
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        onBlock(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
      }
    }
  } catch (err) { /* the connection dropped: reconnect below */ }
  retry("connection to the server lost: reconnecting…");
}

function retry(text) {
  status(text, "bad");
  setTimeout(connect, RETRY_MS);
}

function askKey(message) {
  status("this server needs its API key", "warn");
  $("keyform").hidden = false;
  $("keymsg").textContent = message;
  $("key").focus();
}

$("keyform").addEventListener("submit", (ev) => {
  ev.preventDefault();
  S.key = $("key").value;
  sessionStorage.setItem("minivllm-api-key", S.key);
  connect();
});

function onBlock(block) {
  let event = "message", data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("event: ")) event = line.slice(7);
    else if (line.startsWith("data: ")) data += line.slice(6);
  }
  if (!data) return;
  const msg = JSON.parse(data);
  if (event === "engine") onEngine(msg);
  else if (event === "server") onServer(msg);
  S.dirty = true;
}

// ---- engine events ---------------------------------------------------------------------------
function onEngine(m) {
  const E = engine(m.engine || 0);
  if (m.pid !== E.pid) {  // a new engine (a restart, or the first message): start afresh
    E.pid = m.pid;
    E.grid = null;
    E.rates = [];
  } else if (E.seq !== null && m.seq !== E.seq + 1 && !m.kv.key) {
    E.grid = null;  // a message was dropped: wait for the next key frame
  }
  E.seq = m.seq;
  applyGrid(E, m.kv);
  for (const s of m.steps) {
    E.steps.push(s);
  }
  E.steps.splice(0, Math.max(0, E.steps.length - MAX_BARS));
  const q = m.queues;
  E.queues.push([q.waiting, q.running, q.preempted]);
  E.queues.splice(0, Math.max(0, E.queues.length - MAX_POINTS));
  const c = m.counters;
  E.rates.push([m.time, c.generation_tokens, c.prompt_tokens]);
  while (E.rates.length > 2 && m.time - E.rates[0][0] > RATE_WINDOW_S) E.rates.shift();
  const [t0, g0, p0] = E.rates[0], [t1, g1, p1] = E.rates[E.rates.length - 1];
  const dt = t1 - t0;
  E.tps = dt > 0 ? (g1 - g0) / dt : 0;
  E.prompt_tps = dt > 0 ? (p1 - p0) / dt : 0;
  E.live = m.requests;
  E.last = m;
  if ((m.engine || 0) === S.view) showEngine(E);
}

function showEngine(E) {
  const m = E.last;
  if (!m) return;
  const q = m.queues, c = m.counters;
  $("engine-pid").textContent = m.pid;
  show("step", m.step);
  if (m.steps.length) {
    const last = m.steps[m.steps.length - 1];
    show("step_ms", last[3].toFixed(1));
    show("gap_ms", last[4].toFixed(1));
  }
  for (const k of ["waiting", "running", "preempted", "grammar"]) show(k, q[k]);
  for (const [k, v] of Object.entries(c)) show(k, v);
  show("kv_used", m.kv.used); show("kv_cached", m.kv.cached); show("kv_free", m.kv.free);
  show("kv_blocks", m.kv.blocks); show("kv_per_cell", m.kv.per_cell);
  show("live", m.requests.length);
  show("gen_tps", E.tps.toFixed(1));
  show("prompt_tps", E.prompt_tps.toFixed(1));
  $("rings").textContent = m.rings.map((r) =>
    `${r.name}: request ring ${(100 * r.request).toFixed(1)} %, output ring ` +
    `${(100 * r.output).toFixed(1)} %${r.backlog ? `, backlog ${r.backlog}` : ""}`).join(" · ");
}

function applyGrid(E, kv) {
  if (kv.key || !E.grid || E.grid.length !== kv.cells) {
    if (!kv.key) return;
    E.grid = new Int32Array(kv.cells);
  }
  const r = kv.runs;
  for (let i = 0; i < r.length; i += 3) E.grid.fill(r[i + 2], r[i], r[i] + r[i + 1]);
}

$("engine-select").addEventListener("change", (ev) => {
  S.view = Number(ev.target.value);
  showEngine(engine(S.view));
  S.dirty = true;
});

function drawEngines() {
  const many = S.engines.length > 1;
  $("engines").hidden = $("engine-select").hidden = !many;
  if (!many) return;
  const select = $("engine-select");
  while (select.options.length < S.engines.length) {
    select.add(new Option(`engine ${select.options.length}`, select.options.length));
  }
  $("engines-table").tBodies[0].replaceChildren(...S.engines.map((E, i) => {
    const m = E.last, tr = document.createElement("tr");
    const kv = m ? `${(100 * m.kv.used / m.kv.blocks).toFixed(1)} %` : "-";
    for (const v of [i, E.state, E.serverPid, m ? m.step : "-", m ? m.queues.running : "-",
                     m ? m.queues.waiting : "-", kv, m ? m.counters.generation_tokens : "-",
                     E.tps.toFixed(1)]) {
      const td = document.createElement("td");
      td.textContent = String(v ?? "-");
      tr.append(td);
    }
    return tr;
  }));
}

// ---- server events ---------------------------------------------------------------------------
function onServer(m) {
  const before = S.restarts, dead = m.engines.filter((e) => e.state === "dead");
  const state = dead.length ? "dead" : m.engine_state;
  const name = (e) => m.engines.length > 1 ? `engine ${e.engine}` : "the engine";
  const restarted = m.engines.find((e) => e.restarts > (engine(e.engine).restarts ?? e.restarts));
  for (const e of m.engines) {  // the pid the API server sees (events may lag a restart)
    Object.assign(engine(e.engine), { state: e.state, serverPid: e.pid, restarts: e.restarts });
  }
  show("restarts", m.restarts);
  show("in_flight", m.in_flight);
  $("engine-state").textContent = m.engines.length > 1 ?
    m.engines.map((e) => e.state).join(" / ") : state;
  $("engine-pid").textContent = engine(S.view).serverPid;
  if (dead.length) {
    status(`${dead.map(name).join(", ")} died: the supervisor is restarting it…`, "bad");
  } else if (before !== null && m.restarts > before) {
    const e = restarted || m.engines[0];
    status(`${m.engines.length > 1 ? `engine ${e.engine}` : "engine"} restarted (restart ` +
           `${e.restarts}, now pid ${e.pid}) at ` +
           new Date(m.time * 1000).toLocaleTimeString() + ": reconnected", "warn");
  } else if (S.engineState === "dead" && state === "ready") {
    status("engine back: reconnected", "warn");
  } else if (m.draining) {
    status("the server is draining", "warn");
  }
  S.restarts = m.restarts;
  S.engineState = state;
  for (const name of ["time_to_first_token", "inter_token_latency"]) {
    const h = m[name], short = name === "time_to_first_token" ? "ttft" : "itl";
    if (!h) continue;
    for (const p of ["p50", "p90", "p99"]) {
      show(`${short}_${p}`, h[p] === null ? "-" : (1000 * h[p]).toFixed(1));
    }
    show(`${short}_count`, h.count);
  }
  const sum = (o) => Object.values(o || {}).reduce((a, b) => a + b, 0);
  show("http_success", sum(m.request_success));
  show("http_rejected", sum(m.requests_rejected));
  $("rejected-reasons").textContent = Object.entries(m.requests_rejected || {})
    .map(([k, v]) => `${k} ${v}`).join(", ");
}

// ---- drawing ---------------------------------------------------------------------------------
function canvas2d(id) {
  const el = $(id), ratio = window.devicePixelRatio || 1;
  const w = Math.max(1, Math.round(el.clientWidth * ratio));
  const h = Math.max(1, Math.round(el.clientHeight * ratio));
  if (el.width !== w || el.height !== h) { el.width = w; el.height = h; }
  const ctx = el.getContext("2d");
  ctx.clearRect(0, 0, w, h);
  return [ctx, w, h];
}

function ownerColour(value) {
  return `hsl(${((value - 2) * 137.508) % 360} 70% 58%)`;
}

function drawTimeline() {
  const [ctx, w, h] = canvas2d("timeline");
  const steps = engine(S.view).steps, barW = w / MAX_BARS;
  const maxTokens = Math.max(1, ...steps.map((s) => s[0] + s[2]));
  const maxMs = Math.max(1e-3, ...steps.map((s) => s[3]));
  const x0 = w - steps.length * barW;
  steps.forEach((s, i) => {
    const x = x0 + i * barW, pre = (s[0] / maxTokens) * h, dec = (s[2] / maxTokens) * h;
    ctx.fillStyle = css("--prefill");
    ctx.fillRect(x, h - pre, Math.max(1, barW - 1), pre);
    ctx.fillStyle = css("--decode");
    ctx.fillRect(x, h - pre - dec, Math.max(1, barW - 1), dec);
  });
  ctx.strokeStyle = "#fff";
  ctx.beginPath();
  steps.forEach((s, i) => {
    const x = x0 + (i + 0.5) * barW, y = h - (s[3] / maxMs) * h * 0.95;
    i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
  });
  ctx.stroke();
  ctx.fillStyle = css("--dim");
  ctx.font = `${11 * (window.devicePixelRatio || 1)}px sans-serif`;
  ctx.fillText(`${maxTokens} tokens · ${maxMs.toFixed(1)} ms`, 4, 12 * (window.devicePixelRatio || 1));
}

function drawGrid() {
  const [ctx, w, h] = canvas2d("kvgrid");
  const grid = engine(S.view).grid;
  if (!grid) return;
  const cols = Math.ceil(Math.sqrt(grid.length * w / h)), rows = Math.ceil(grid.length / cols);
  const size = Math.min(w / cols, h / rows), gap = size > 4 ? 1 : 0;
  const free = css("--free"), cached = css("--cached");
  for (let i = 0; i < grid.length; i++) {
    const v = grid[i];
    ctx.fillStyle = v === 0 ? free : v === 1 ? cached : ownerColour(v);
    ctx.fillRect((i % cols) * size, Math.floor(i / cols) * size, size - gap, size - gap);
  }
}

function drawQueues() {
  const [ctx, w, h] = canvas2d("queues");
  const points = engine(S.view).queues, max = Math.max(1, ...points.map((p) => Math.max(...p)));
  [css("--warn"), css("--ok"), css("--bad")].forEach((colour, k) => {
    ctx.strokeStyle = colour;
    ctx.beginPath();
    points.forEach((p, i) => {
      const x = w - (points.length - i) * (w / MAX_POINTS), y = h - (p[k] / max) * (h - 2) - 1;
      i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
    });
    ctx.stroke();
  });
}

function drawLive() {
  const body = $("live").tBodies[0];
  body.replaceChildren(...engine(S.view).live.map((r) => {
    const tr = document.createElement("tr");
    const cells = [r.client, r.id, r.state, r.prompt, r.computed, r.output];
    cells.forEach((v, i) => {
      const td = document.createElement("td");
      if (i === 2 && r.index >= 0) {
        const swatch = document.createElement("span");
        swatch.className = "key";
        swatch.style.background = ownerColour(r.index + 2);
        td.append(swatch);
      }
      td.append(String(v));
      tr.append(td);
    });
    return tr;
  }));
}

function frame() {
  if (S.dirty) {
    S.dirty = false;
    drawTimeline(); drawGrid(); drawQueues(); drawLive(); drawEngines();
  }
  requestAnimationFrame(frame);
}

window.addEventListener("resize", () => { S.dirty = true; });
requestAnimationFrame(frame);
connect();
