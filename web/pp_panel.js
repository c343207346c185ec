// Pipeline-parallel panel for the ComfyUI frontend (comfyui-frontend-package 1.35.x).
//
// * A sidebar tab "Pipeline parallel": the worker group (backend, devices, memory per
//   device, which blocks of which model each rank holds, state), the timeline of the
//   last run (compute per micro-batch and waits, per rank, a few steps) with the
//   measured step time against the ideal M·S/(M+S−1), and buttons to release the
//   GPU memory or shut the group down.
// * Under the widgets of every PP Stage Split node: a bar drawing the split (blocks and
//   estimated weight memory per GPU) for the model the node is wired to.
//
// Data: GET /api/pp/status, /api/pp/timeline, /api/pp/split; websocket events
// "pp.status" and "pp.timeline"; POST /api/pp/release, /api/pp/shutdown.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TAB_ID = "pp-panel";
const COLORS = { cond: "#4e9af1", uncond: "#f0a04b", "cond+uncond": "#a27ee8" };
const MB_COLORS = ["#4e9af1", "#f0a04b", "#5cc98a", "#e86a8c", "#a27ee8", "#d8c75a", "#5fc5d4", "#c2855c"];
const STAGE_COLORS = ["#4e9af1", "#f0a04b", "#5cc98a", "#e86a8c", "#a27ee8", "#d8c75a", "#5fc5d4", "#c2855c"];

// -- shared state ------------------------------------------------------------------------
const store = { status: null, timeline: null, error: null, busy: null, listeners: new Set() };

function notify() {
  for (const fn of store.listeners) {
    try { fn(); } catch (e) { console.error("[pp panel]", e); }
  }
}

async function getJson(path) {
  const r = await api.fetchApi(path, { cache: "no-store" });
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

async function refresh() {
  try {
    const [status, timeline] = await Promise.all([getJson("/pp/status"), getJson("/pp/timeline")]);
    store.status = status;
    store.timeline = timeline;
    store.error = null;
  } catch (e) {
    store.error = String(e.message || e);
  }
  notify();
}

async function post(action, key) {
  store.busy = action;
  notify();
  try {
    const r = await api.fetchApi(`/pp/${action}`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ key }),
    });
    const body = await r.json().catch(() => ({}));
    store.error = r.ok ? null : (body.error || `HTTP ${r.status}`);
  } catch (e) {
    store.error = String(e.message || e);
  }
  store.busy = null;
  await refresh();
}

api.addEventListener("pp.status", (e) => { store.status = e.detail; notify(); });
api.addEventListener("pp.timeline", (e) => { store.timeline = e.detail; notify(); refreshSplitWidgets(); });
api.addEventListener("reconnected", () => refresh());

// -- helpers -------------------------------------------------------------------------------
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

function fmtBytes(n) {
  if (n == null) return "?";
  const g = n / 2 ** 30;
  if (g >= 1) return `${g.toFixed(g >= 10 ? 0 : 1)} GiB`;
  return `${(n / 2 ** 20).toFixed(0)} MiB`;
}

const fmtMs = (ms) => (ms == null ? "?" : ms >= 100 ? `${ms.toFixed(0)} ms` : `${ms.toFixed(1)} ms`);

function stateClass(state) {
  return { running: "run", idle: "ok", starting: "start", failed: "fail", stopped: "off" }[state] || "off";
}

function barColor(bar) {
  return COLORS[bar.branch] || MB_COLORS[(bar.mb ?? 0) % MB_COLORS.length];
}

// -- the panel -----------------------------------------------------------------------------
function renderGroup(g) {
  const ranks = (g.ranks || []).map((r) => {
    const mem = r.mem || {};
    const used = mem.used, total = mem.total;
    const pct = used != null && total ? Math.min(100, (100 * used) / total) : 0;
    const memText = used != null ? `${fmtBytes(used)} / ${fmtBytes(total)}` : "—";
    const peak = mem.peak != null ? ` · peak ${fmtBytes(mem.peak)}` : "";
    const what = mem.kind === "cpu" ? "process RSS / RAM" : "device used / total";
    const pf = r.patch_pipelining;  // approximate mode: its keys/values cache on this rank
    const graphs = !pf ? "" : pf.graphs ? `, ${pf.graphs} CUDA graphs` : pf.graphs_failed ? ", eager (not capturable)" : "";
    const kv = pf ? ` · patches: ${pf.patched_passes} passes, KV cache ${fmtBytes(pf.cache_bytes)}${graphs}` : "";
    return `<tr class="pp-rank-row" data-rank="${r.rank}">
      <td class="pp-rank-id"><span class="pp-dot" style="background:${STAGE_COLORS[(r.pp_rank ?? r.rank) % STAGE_COLORS.length]}"></span>${r.rank}</td>
      <td><div class="pp-dev">${esc(r.device)}</div><div class="pp-sub">${esc(r.name || "")}${r.pid ? ` · pid ${r.pid}` : ""}</div></td>
      <td class="pp-stage">${r.blocks ? esc(r.blocks) : "<span class='pp-sub'>no stage yet</span>"}
        ${r.pp_rank != null ? `<div class="pp-sub">stage ${r.pp_rank}${g.layout && g.layout.cfg > 1 ? `, cfg ${r.cfg_rank}` : ""}${g.layout && g.layout.sp > 1 ? `, shard ${r.sp_rank}` : ""}</div>` : ""}</td>
      <td class="pp-mem" title="${what}${esc(peak)}"><div class="pp-membar"><div style="width:${pct.toFixed(1)}%"></div></div>
        <div class="pp-sub">${memText}${peak}${esc(kv)}</div></td>
    </tr>`;
  }).join("");
  const model = g.model ? `${esc(g.model)}${g.model_file ? ` <span class="pp-sub">${esc(g.model_file)}</span>` : ""}` : "<span class='pp-sub'>none placed yet</span>";
  const failure = g.state === "failed" && g.failure
    ? `<div class="pp-failure" title="${esc(g.failure)}">${esc(g.failure)}</div>` : "";
  const prog = g.progress && g.progress.total
    ? `<div class="pp-progress"><div style="width:${(100 * g.progress.step / g.progress.total).toFixed(1)}%"></div></div>` : "";
  const canAct = g.state === "idle" || g.state === "failed";
  return `<section class="pp-group" data-key="${esc(g.key)}" data-state="${esc(g.state)}">
    <div class="pp-group-head">
      <span class="pp-state pp-state-${stateClass(g.state)}">${esc(g.state === "failed" ? "failed" : (g.display_state || g.state))}</span>
      <span class="pp-sub">${esc(g.backend)} · ${esc((g.devices || []).join(", "))}</span>
    </div>
    ${prog}${failure}
    <div class="pp-kv"><span>model</span><span>${model}</span></div>
    <div class="pp-kv"><span>layout</span><span>${esc(g.layout_text || "—")}${g.split ? ` · split ${esc(g.split.join(" + "))} blocks` : ""}</span></div>
    ${g.layout_reason ? `<div class="pp-kv"><span>why</span><span>${esc(g.layout_reason)}</span></div>` : ""}
    <table class="pp-ranks"><thead><tr><th>rank</th><th>device</th><th>stage</th><th>memory</th></tr></thead><tbody>${ranks}</tbody></table>
    <div class="pp-actions">
      <button class="pp-btn pp-release" ${g.state === "idle" && !g.parked && !store.busy ? "" : "disabled"}
        title="Drop the placed model on every worker; the workers stay up">Release GPU memory</button>
      <button class="pp-btn pp-shutdown" ${canAct && !store.busy ? "" : "disabled"}
        title="Stop the worker processes; the next prompt starts a fresh group">Shut group down</button>
    </div>
  </section>`;
}

function renderTimeline(tl, width) {
  if (!tl || !tl.available) {
    return `<div class="pp-empty pp-timeline-empty">${esc((tl && tl.note) || "no run yet: queue a prompt with PP KSampler")}</div>`;
  }
  const ranks = tl.ranks || [];
  const labelW = 58, rowH = 20, gap = 6, top = 16, axisH = 18;
  const W = Math.max(260, width), plotW = W - labelW - 8;
  const H = top + ranks.length * (rowH + gap) + axisH;
  const x = (t) => labelW + (plotW * t) / Math.max(1e-9, tl.window_ms);
  const y = (r) => top + r * (rowH + gap);
  let svg = `<svg class="pp-timeline-svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}">`;
  svg += `<defs><pattern id="pp-hatch" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">
    <rect width="6" height="6" fill="rgba(140,140,140,0.18)"/><line x1="0" y1="0" x2="0" y2="6" stroke="rgba(160,160,160,0.55)" stroke-width="2"/></pattern></defs>`;
  let lastLabel = -1e9;
  for (const s of tl.step_starts || []) {
    svg += `<line class="pp-step-line" x1="${x(s.t)}" x2="${x(s.t)}" y1="${top - 12}" y2="${H - axisH + 2}"/>`;
    if (x(s.t) - lastLabel > 42) {  // no overlapping labels when steps are short
      svg += `<text class="pp-step-text" x="${x(s.t) + 3}" y="${top - 4}">step ${s.step}</text>`;
      lastLabel = x(s.t);
    }
  }
  ranks.forEach((r, i) => {
    const stage = r.stage ? ` ${r.stage[0]}–${r.stage[1] - 1}` : "";
    svg += `<text class="pp-row-label" x="4" y="${y(i) + rowH / 2 + 4}">rank ${r.rank}</text>`;
    svg += `<title>${esc(stage)}</title>`;
    svg += `<rect class="pp-row-bg" x="${labelW}" y="${y(i)}" width="${plotW}" height="${rowH}"/>`;
  });
  for (const b of tl.bars || []) {
    const row = ranks.findIndex((r) => r.rank === b.rank);
    if (row < 0) continue;
    const x0 = x(b.t0), w = Math.max(1, x(b.t1) - x0);
    const dur = b.t1 - b.t0;
    const tip = `rank ${b.rank} · step ${b.step} · ${b.kind} ${b.label}${b.shard != null ? ` · shard ${b.shard}` : ""} · ${fmtMs(dur)}`;
    if (b.kind === "compute") {
      // patches of one micro-batch: the branch's colour, lighter patch by patch, each outlined
      const shade = b.patch ? ` fill-opacity="${(1 - 0.15 * ((b.patch - 1) % 4)).toFixed(2)}" stroke="#222" stroke-width="0.5"` : "";
      svg += `<rect class="pp-bar pp-bar-compute" data-rank="${b.rank}" data-step="${b.step}"${b.patch ? ` data-patch="${b.patch}"` : ""} x="${x0.toFixed(2)}" y="${y(row) + 1}" width="${w.toFixed(2)}" height="${rowH - 2}" rx="2" fill="${barColor(b)}"${shade}><title>${esc(tip)}</title></rect>`;
    } else {
      svg += `<rect class="pp-bar pp-bar-wait" data-rank="${b.rank}" data-step="${b.step}" x="${x0.toFixed(2)}" y="${y(row) + 5}" width="${w.toFixed(2)}" height="${rowH - 10}" fill="url(#pp-hatch)"><title>${esc(tip)}</title></rect>`;
    }
  }
  const axisY = H - axisH + 12;
  svg += `<text class="pp-axis" x="${labelW}" y="${axisY}">0</text>`;
  svg += `<text class="pp-axis" x="${labelW + plotW}" y="${axisY}" text-anchor="end">${fmtMs(tl.window_ms)}</text>`;
  svg += `</svg>`;

  const s = tl.summary || {};
  const eff = s.efficiency != null ? `${Math.round(100 * s.efficiency)}%` : "?";
  const branches = [...new Set((tl.bars || []).filter((b) => b.kind === "compute").map((b) => b.branch))];
  const legend = branches.map((b) => `<span><i style="background:${COLORS[b] || MB_COLORS[(parseInt(String(b).replace("mb", "")) || 0) % MB_COLORS.length]}"></i>${esc(b)}</span>`).join("")
    + `<span><i class="pp-hatch-i"></i>wait / transfer</span>`;
  const title = `${esc(tl.model || "")}${tl.devices ? ` on ${esc(tl.devices.join(", "))}` : ""} — steps ${esc((tl.steps || []).join(", "))} of ${tl.steps_total}`;
  return `<div class="pp-timeline" data-steps="${(tl.steps || []).length}">
    <div class="pp-sub">${title}</div>
    ${svg}
    <div class="pp-legend">${legend}</div>
    <div class="pp-metrics">
      <div><b class="pp-measured">${fmtMs(s.measured_step_ms)}</b><span>measured step</span></div>
      <div><b class="pp-ideal">${fmtMs(s.ideal_step_ms)}</b><span>ideal for PP${s.stages}${s.cfg > 1 ? `×CFG${s.cfg}` : ""}, ${s.micro_batches} micro-batch${s.micro_batches === 1 ? "" : "es"} (${(s.ideal_speedup ?? 1).toFixed(2)}×)</span></div>
      <div><b class="pp-efficiency">${eff}</b><span>efficiency (ideal / measured)</span></div>
      <div><b>${fmtMs(s.one_device_ms)}</b><span>one device (sum of compute) → ${(s.speedup_vs_one_device ?? 0).toFixed(2)}×</span></div>
    </div>
    <div class="pp-hint">S stages with M micro-batches per step fill and drain the pipeline every step:
      at best M·S/(M+S−1) over one device (2 GPUs, cond+uncond: 1.33×; without CFG: 1.0×). Hatched: a rank waiting for its input (bubbles, transfers).</div>
  </div>`;
}

function renderPanel(root) {
  const st = store.status;
  const groups = (st && st.groups) || [];
  const width = Math.max(260, (root.clientWidth || 380) - 24);
  let html = `<div class="pp-title"><span>Pipeline parallel</span>
    <button class="pp-btn pp-refresh" title="Refresh">↻</button></div>`;
  if (store.error) html += `<div class="pp-failure">${esc(store.error)}</div>`;
  if (!st) {
    html += `<div class="pp-empty">loading…</div>`;
  } else if (!groups.length) {
    html += `<div class="pp-empty pp-not-started"><b>not started</b><br>No worker group yet. Queue a workflow with
      <b>PP KSampler</b> and a <b>PP Worker Group</b>: the group starts on the first prompt and stays up.</div>`;
  } else {
    html += groups.map(renderGroup).join("");
  }
  html += `<h4 class="pp-h">Last run</h4>` + renderTimeline(store.timeline, width);
  root.innerHTML = html;
  root.querySelector(".pp-refresh")?.addEventListener("click", () => refresh());
  root.querySelectorAll(".pp-group").forEach((sec) => {
    const key = sec.dataset.key;
    sec.querySelector(".pp-release")?.addEventListener("click", () => post("release", key));
    sec.querySelector(".pp-shutdown")?.addEventListener("click", () => post("shutdown", key));
  });
}

function mountPanel(el) {
  const root = document.createElement("div");
  root.className = "pp-panel";
  el.appendChild(root);
  const draw = () => renderPanel(root);
  store.listeners.add(draw);
  draw();
  refresh();
  const timer = setInterval(refresh, 5000);  // websocket events do the live work; this is a fallback
  return () => { store.listeners.delete(draw); clearInterval(timer); };
}

// -- the PP Stage Split bar --------------------------------------------------------------------
const splitNodes = new Set();

function inputNode(node, name) {
  const slot = node.findInputSlot ? node.findInputSlot(name) : (node.inputs || []).findIndex((i) => i.name === name);
  return slot >= 0 ? node.getInputNode(slot) : null;
}

function widgetValue(node, name) {
  return node?.widgets?.find((w) => w.name === name)?.value;
}

function splitContext(node) {
  // PP Stage Split -> PP KSampler -> (model chain) -> a loader with unet_name; group -> devices
  const ctx = {};
  for (const sampler of node.getOutputNodes?.(0) || []) {
    let m = inputNode(sampler, "model"), hops = 0;
    while (m && hops++ < 16 && ctx.unet_name == null) {
      const unet = widgetValue(m, "unet_name");
      if (unet != null) { ctx.unet_name = unet; break; }
      const slot = (m.inputs || []).findIndex((i) => i.type === "MODEL");
      m = slot >= 0 ? m.getInputNode(slot) : null;
    }
    const grp = inputNode(sampler, "group");
    if (grp && widgetValue(grp, "devices") != null) ctx.devices = widgetValue(grp, "devices");
    const cfg = inputNode(sampler, "cfg_mode");
    if (cfg && widgetValue(cfg, "mode") != null) ctx.cfg_mode = widgetValue(cfg, "mode");
    if (ctx.unet_name != null) break;
  }
  return ctx;
}

async function updateSplit(node) {
  const w = node.__ppSplit;
  if (!w) return;
  const q = new URLSearchParams({ strategy: widgetValue(node, "strategy") || "balanced", manual: widgetValue(node, "manual") || "" });
  const ctx = splitContext(node);
  for (const k of ["unet_name", "devices", "cfg_mode"]) if (ctx[k] != null) q.set(k, ctx[k]);
  const ask = q.toString();
  w.asked = ask;
  try {
    const data = await getJson(`/pp/split?${ask}`);
    if (w.asked !== ask) return;
    w.data = data;
  } catch (e) {
    w.data = { error: String(e.message || e), strategy: q.get("strategy") };
  }
  node.setDirtyCanvas?.(true, true);
  app.graph?.setDirtyCanvas?.(true, true);
}

function refreshSplitWidgets() {
  for (const n of splitNodes) if (n.graph) updateSplit(n);
}

function drawSplit(ctx, node, width, y, data) {
  const m = 10, h = 16, x0 = m, w = width - 2 * m;
  ctx.save();
  ctx.font = "10px sans-serif";
  ctx.textBaseline = "middle";
  const d = data || {};
  const counts = d.counts && d.counts.length ? d.counts : null;
  const stages = counts ? counts.length : (d.stages || 2);
  const total = counts ? counts.reduce((a, b) => a + b, 0) : stages;
  let x = x0;
  for (let s = 0; s < stages; s++) {
    const c = counts ? counts[s] : 1;
    const sw = (w * c) / total;
    ctx.fillStyle = STAGE_COLORS[s % STAGE_COLORS.length];
    ctx.globalAlpha = counts ? 0.9 : 0.35;
    ctx.beginPath();
    ctx.roundRect ? ctx.roundRect(x + 1, y + 2, sw - 2, h, 3) : ctx.rect(x + 1, y + 2, sw - 2, h);
    ctx.fill();
    ctx.globalAlpha = 1;
    ctx.fillStyle = "#fff";
    let label = counts ? `GPU${s}: ${c}` : `GPU${s}`;
    if (counts && d.ranges) label = `GPU${s}: ${d.ranges[s][0]}–${d.ranges[s][1] - 1}`;
    if (d.bytes) label += ` · ${fmtBytes(d.bytes[s])}`;
    ctx.textAlign = "center";
    ctx.fillText(label, x + sw / 2, y + 2 + h / 2, Math.max(8, sw - 4));
    x += sw;
  }
  ctx.textAlign = "left";
  ctx.fillStyle = d.error ? "#e66" : "#999";
  let line = d.error ? d.error
    : d.model ? `${d.strategy}: ${d.model.family}, ${d.model.num_blocks} blocks${d.cfg > 1 ? `, ×${d.cfg} CFG` : ""} — ${d.model.file}`
      : `${d.strategy || ""}: ${d.note || "connect a model and run once"}`;
  ctx.fillText(line, x0, y + h + 12, w);
  ctx.restore();
}

function addSplitWidget(node) {
  const widget = {
    name: "pp_split_preview", type: "pp_split_preview", value: "", serialize: false,
    options: { serialize: false }, data: null, asked: null,
    draw(ctx, n, width, y) { drawSplit(ctx, n, width, y, this.data); },
    computeSize(width) { return [width, 40]; },
  };
  node.__ppSplit = node.addCustomWidget(widget) || widget;
  splitNodes.add(node);
  for (const name of ["strategy", "manual"]) {
    const w = node.widgets?.find((x) => x.name === name);
    if (!w) continue;
    const orig = w.callback;
    w.callback = function (...args) {
      const r = orig?.apply(this, args);
      updateSplit(node);
      return r;
    };
  }
  const onConn = node.onConnectionsChange;
  node.onConnectionsChange = function (...args) {
    const r = onConn?.apply(this, args);
    setTimeout(() => updateSplit(node), 0);
    return r;
  };
  const onRemoved = node.onRemoved;
  node.onRemoved = function (...args) { splitNodes.delete(node); return onRemoved?.apply(this, args); };
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0], 300), Math.max(node.size[1], size[1])]);
  setTimeout(() => updateSplit(node), 0);
}

// -- registration ---------------------------------------------------------------------------
app.registerExtension({
  name: "comfyui-pipeline-parallel.panel",
  async setup() {
    if (!document.getElementById("pp-panel-css")) {
      const link = document.createElement("link");
      link.id = "pp-panel-css";
      link.rel = "stylesheet";
      link.href = new URL("./pp_panel.css", import.meta.url).href;
      document.head.appendChild(link);
    }
    let unmount = null;
    app.extensionManager.registerSidebarTab({
      id: TAB_ID,
      icon: "pi pi-server",
      title: "Pipeline parallel",
      tooltip: "Pipeline parallel: worker group and timeline",
      type: "custom",
      render: (el) => { unmount?.(); unmount = mountPanel(el); },
      destroy: () => { unmount?.(); unmount = null; },
    });
    refresh();
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "PPStageSplit") return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const r = onNodeCreated?.apply(this, args);
      addSplitWidget(this);
      return r;
    };
  },
  async afterConfigureGraph() {
    refreshSplitWidgets();
  },
});

// For tests and debugging.
window.ppPanel = { store, refresh, tabId: TAB_ID };
