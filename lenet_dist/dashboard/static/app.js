// The dashboard page: every run the evaluator knows (/api/runs), the chosen ones overlaid on every chart (one
// colour per run), one of them focused (the headline, the checkpoint panels and the drawing pad follow it).
// Each run's series come once from /api/history?run=KEY, then /api/stream (server-sent events) adds to them.
// Charts by uPlot. Steps are counted as the step rows count them (steps done, 1 after the first) and epochs
// from 1, the epoch a step belongs to (run/telemetry.py): headline, charts and tables alike.
"use strict";

const series = {};         // run key -> {steps, evals, marks, timeline, config, loaded}
let steps = [];            // the focused run's step rows (series[focused].steps)
let evals = [];            // the focused run's evaluations
const charts = {};         // chart id -> uPlot (tests read them)
let runsList = [];         // /api/runs, oldest first
let shownKey = null;       // the run the evaluator shows first
let focused = null;        // the run the headline and the checkpoint panels follow
let serverStarted = null;  // /api/state's started: a different one is another server (a restart)
let redrawPending = false;
let chartShape = "";       // what the charts were built for; a change rebuilds them
let mapsOfTestImage = true;   // the feature maps show a test image (else the drawn digit)
let mapsTicket = 0;           // every request that would redraw the maps takes one; only the newest may
const chosen = new Set(JSON.parse(localStorage.getItem("lenet.chosen") || "[]"));
const view = { log: localStorage.getItem("lenet.log") === "1", smooth: Number(localStorage.getItem("lenet.smooth") || 0) };

const COLOURS = ["#2a6fdb", "#e0653a", "#1e9e6a", "#bf3f8f", "#c9a227", "#6a4fbf", "#3a9fb5", "#8a5a2b"];
const PHASES = [["data", "#8fb3e8"], ["forward", "#2a6fdb"], ["backward", "#1e9e6a"], ["wait", "#e0653a"],
                ["update", "#c9a227"], ["other", "#999"]];

const $ = (id) => document.getElementById(id);
const fmt = (v, d = 4) => (v === null || v === undefined ? "–" : Number(v).toFixed(d));
const pct = (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(2) + "%");
const nameOf = (key) => ((runsList.find((r) => r.key === key) || {}).name || (key || "").slice(0, 8) || "run");
const q = (key) => (key ? "?run=" + encodeURIComponent(key) : "");

async function getJSON(path, options) {
  const r = await fetch(path, options);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function bytes(b64) {
  const s = atob(b64);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

// A grey image (values 0..255, h x w) on a canvas, `scale` screen pixels per pixel.
function greyCanvas(values, h, w, scale, signed) {
  const c = document.createElement("canvas");
  c.width = w; c.height = h;
  c.style.width = w * scale + "px"; c.style.height = h * scale + "px";
  const ctx = c.getContext("2d");
  const img = ctx.createImageData(w, h);
  for (let i = 0; i < h * w; i++) {
    const v = values[i];
    let r = v, g = v, b = v;
    if (signed) { r = v >= 0 ? 255 : 255 + v; g = 255 - Math.abs(v); b = v <= 0 ? 255 : 255 - v; }
    img.data.set([r, g, b, 255], 4 * i);
  }
  ctx.putImageData(img, 0, 0);
  return c;
}

function tile(canvas, text) {
  const d = document.createElement("div");
  d.className = "tile";
  d.appendChild(canvas);
  if (text) { const t = document.createElement("span"); t.textContent = text; d.appendChild(t); }
  return d;
}

// ------------------------------------------------------------------------------------------ runs' series
function runOf(key) {
  if (!series[key]) series[key] = { steps: [], evals: [], marks: [], timeline: null, config: null, loaded: false };
  return series[key];
}

function colourOf(key) {
  const i = runsList.findIndex((r) => r.key === key);
  return COLOURS[(i < 0 ? Object.keys(series).indexOf(key) : i) % COLOURS.length];
}

// The trainer's rows of a run, in step order, each once: step rows, lr and control marks, the newest timeline.
function addRows(key, rows) {
  const s = runOf(key);
  rows.forEach((r) => {
    const kind = r.event || "step";
    if (r.config && !s.config) s.config = r.config;
    if (kind === "step") {
      const last = s.steps.length ? s.steps[s.steps.length - 1].step : -1;
      if (r.step > last) s.steps.push(r);
      else if (!s.steps.some((x) => x.step === r.step)) { s.steps.push(r); s.steps.sort((a, b) => a.step - b.step); }
    } else if (kind === "lr" || kind === "control") {
      if (!s.marks.some((m) => m.event === kind && m.step === r.step)) s.marks.push(r);
    } else if (kind === "timeline") {
      s.timeline = r;
    }
  });
}

function addEvaluation(e, key) {
  const s = runOf(key || e.run || focused);
  const i = s.evals.findIndex((x) => x.step === e.step);
  if (i >= 0) s.evals[i] = e; else { s.evals.push(e); s.evals.sort((a, b) => a.step - b.step); }
}

async function load(key) {
  const s = runOf(key);
  if (s.loaded) return;
  s.loaded = true;
  try {
    const h = await getJSON("/api/history" + q(key));
    addRows(key, h.steps.concat(h.marks || [], h.timeline ? [h.timeline] : []));
    if (h.config) s.config = h.config;
    s.hasCheckpoint = s.hasCheckpoint || h.has_checkpoint;
    h.evaluations.forEach((e) => addEvaluation(e, key));
  } catch (err) {
    s.loaded = false;
    $("runs-note").textContent = `run ${nameOf(key)}: ${err.message}`;
  }
  scheduleRedraw();
}

// The runs drawn: the chosen ones that still exist, the focused one always, in the list's order.
function drawn() {
  const keys = runsList.map((r) => r.key).filter((k) => chosen.has(k) || k === focused);
  if (focused && !keys.includes(focused)) keys.unshift(focused);
  return keys;
}

// ---------------------------------------------------------------------------------------------- charts
// [step, value] points of the telemetry rows, with a null point where rows are missing (the trainer's rows
// of those steps never reached this evaluator, e.g. while it was restarted): a gap is a gap, never a line.
function gapped(rows, value) {
  const out = [];
  rows.forEach((r, i) => {
    const prev = rows[i - 1];
    if (prev && r.step - prev.step > 2 * Math.max(r.steps || 1, prev.steps || 1)) out.push([prev.step + 1, null]);
    out.push([r.step, value(r)]);
  });
  return out;
}

// [step, value] points of the evaluations, a null between two evaluator processes' (a restart): the
// checkpoints served while none was running were never evaluated, and no line pretends they were.
function evalPoints(list, value) {
  const out = [];
  list.forEach((e, i) => {
    const prev = list[i - 1], v = value(e);
    if (prev && prev.evaluator && e.evaluator && prev.evaluator !== e.evaluator) out.push([(prev.step + e.step) / 2, null]);
    if (v !== null && v !== undefined) out.push([e.step, v]);
  });
  return out;
}

// An exponential moving average (bias-corrected, as TensorBoard's) that starts afresh after a gap; the raw
// points stay drawn beside it, faint.
function smoothed(points, weight) {
  let v = 0, n = 0;
  return points.map(([x, y]) => {
    if (y === null || y === undefined) { v = 0; n = 0; return [x, y]; }
    v = weight * v + (1 - weight) * y;
    n++;
    return [x, v / (1 - Math.pow(weight, n))];
  });
}

// Each chart: its kinds of series, drawn once per run (one colour per run; kinds by dash and points).
const CHARTS = [
  { id: "chart-loss", title: "Loss", y: "loss", logToggle: true, kinds: (s) => [
    { label: "train", points: gapped(s.steps, (r) => r.loss), smooth: true },
    { label: "test", points: evalPoints(s.evals, (e) => e.test_loss ?? e.loss), dots: true },
    { label: "validation", points: evalPoints(s.evals, (e) => e.val_loss), dots: true, dash: [6, 3] }] },
  { id: "chart-acc", title: "Accuracy", y: "fraction", zoom: true, kinds: (s) => [
    { label: "train", points: gapped(s.steps, (r) => r.acc), smooth: true },
    { label: "test", points: evalPoints(s.evals, (e) => e.test_accuracy ?? e.accuracy), dots: true },
    { label: "validation", points: evalPoints(s.evals, (e) => e.val_accuracy), dots: true, dash: [6, 3] }] },
  { id: "chart-speed", title: "Images/s", y: "images/s", needsRows: true, kinds: (s) => [
    { label: "total", points: gapped(s.steps, (r) => r.images_per_s), smooth: true }].concat(
    range(ranksOf(s, "rank_images_per_s")).map((k) => ({
      label: "rank " + k, hidden: true, width: 1,                  // equal on equal shards: off unless asked for
      points: gapped(s.steps, (r) => (r.rank_images_per_s || [])[k] ?? null) }))) },
  { id: "chart-ranks", title: "Seconds per step, by rank: compute (solid), wait (dashed)", y: "s / step",
    needsRows: true, kinds: (s) => range(ranksOf(s, "rank_compute_s")).flatMap((k) => [
      { label: `rank ${k} compute`, shade: k, points: gapped(s.steps, (r) => perStep(r, "rank_compute_s", k)) },
      { label: `rank ${k} wait`, shade: k, dash: [5, 3], points: gapped(s.steps, (r) => perStep(r, "rank_wait_s", k)) }]) },
  { id: "chart-lr", title: "Learning rate", y: "lr", needsRows: true, kinds: (s) => [
    { label: "lr", points: gapped(s.steps, (r) => r.lr) }] },
  { id: "chart-lag", title: "Evaluator lag", y: "steps", kinds: (s) => [
    { label: "steps behind", points: evalPoints(s.evals, (e) => e.lag_steps), dots: true }] },
];

const range = (n) => Array.from({ length: n }, (_, k) => k);
const ranksOf = (s, field) => s.steps.reduce((n, r) => Math.max(n, (r[field] || []).length), 0);
const perStep = (r, field, k) => { const v = (r[field] || [])[k]; return v === undefined ? null : v / (r.steps || 1); };

// Rows keyed by step -> [xs, col1, col2...] over the union of steps (undefined where a series has no point:
// uPlot steps over it; a null is a gap and breaks the line).
function columns(tables) {
  const xs = Array.from(new Set(tables.flatMap((t) => t.map((p) => p[0])))).sort((a, b) => a - b);
  const index = new Map(xs.map((x, i) => [x, i]));
  const cols = tables.map((t) => { const c = new Array(xs.length).fill(undefined); t.forEach((p) => { c[index.get(p[0])] = p[1]; }); return c; });
  return [xs].concat(cols);
}

function shade(hex, k) {          // rank k of a run: its colour, lighter for each further rank
  const n = parseInt(hex.slice(1), 16), f = Math.min(0.6, 0.22 * k);
  const c = [n >> 16, (n >> 8) & 255, n & 255].map((v) => Math.round(v + (255 - v) * f));
  return "#" + c.map((v) => v.toString(16).padStart(2, "0")).join("");
}

// The lr and control rows of the drawn runs as vertical marks with a label, on every step-axis chart.
function marksPlugin() {
  return { hooks: { draw: [(u) => {
    const ctx = u.ctx, top = u.bbox.top, bottom = top + u.bbox.height;
    ctx.save();
    ctx.font = `${Math.round(10 * devicePixelRatio)}px system-ui, sans-serif`;
    drawn().forEach((key, n) => (runOf(key).marks || []).forEach((m, i) => {
      const x = u.valToPos(m.step, "x", true);
      if (!(x >= u.bbox.left && x <= u.bbox.left + u.bbox.width)) return;
      ctx.strokeStyle = ctx.fillStyle = colourOf(key);
      ctx.setLineDash([2 * devicePixelRatio, 2 * devicePixelRatio]);
      ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, bottom); ctx.stroke();
      ctx.fillText(markLabel(m), x + 3 * devicePixelRatio, top + (10 + 11 * ((i + 2 * n) % 4)) * devicePixelRatio);
    }));
    ctx.restore();
  }] } };
}

function markLabel(m) {
  if (m.event === "lr") return `lr ${Number(m.lr).toPrecision(2)}`;
  return m.action + (m.value !== undefined && m.value !== null ? " " + m.value : "");
}

function chartWidth() {                    // as many charts a row as fit at 380 px or more, none wider than the box
  const box = ($("charts").clientWidth || 440) - 4, gap = 12;
  const perRow = Math.max(1, Math.floor((box + gap) / (380 + gap)));
  return Math.max(200, Math.min(600, Math.floor((box - gap * (perRow - 1)) / perRow)));
}

// Build (or rebuild, when the runs drawn or the view change) every chart; then only their data change.
function buildCharts(keys, kinds) {
  const width = chartWidth();
  CHARTS.forEach((def) => {
    const el = $(def.id);
    if (charts[def.id]) charts[def.id].destroy();
    const ser = [{ label: "step" }];
    keys.forEach((key, i) => {
      const colour = colourOf(key), name = nameOf(key);
      kinds[def.id][i].forEach((k) => {
        ser.push({ label: `${name} ${k.label}`, stroke: k.shade !== undefined ? shade(colour, k.shade) : colour,
                   dash: k.dash, width: k.width || 1.5, spanGaps: false, show: !k.hidden,
                   points: k.dots ? { show: true, size: 6 } : { show: false } });
      });
      if (view.smooth > 0) kinds[def.id][i].filter((k) => k.smooth).forEach((k) => {
        ser.push({ label: `${name} ${k.label} (raw)`, stroke: colour + "44", width: 1, spanGaps: false,
                   points: { show: false } });
      });
    });
    const y = { auto: true };
    if (def.logToggle && view.log) Object.assign(y, { distr: 3 });
    if (def.zoom) y.range = (u, lo, hi) => {          // the data's own range, padded, within [0, 1]
      if (lo === null || hi === null) return [0, 1];
      const pad = Math.max(0.002, 0.06 * (hi - lo));
      return [Math.max(0, lo - pad), Math.min(1, hi + pad)];
    };
    charts[def.id] = new uPlot({
      title: def.title, width, height: 220,
      scales: { x: { time: false }, y },
      axes: [{ label: "step" }, { label: def.y, size: 60 }],
      series: ser,
      legend: { live: true },                           // the values under the cursor
      cursor: { drag: { x: true, y: false } },          // drag to zoom the steps; a double click zooms out
      plugins: [marksPlugin()],
    }, [[]].concat(ser.slice(1).map(() => [])), el);
  });
}

function redraw() {
  redrawPending = false;
  const keys = drawn();
  steps = focused ? runOf(focused).steps : [];
  evals = focused ? runOf(focused).evals : [];
  const kinds = {};
  CHARTS.forEach((def) => { kinds[def.id] = keys.map((key) => def.kinds(runOf(key))); });
  const shape = JSON.stringify([keys, keys.map(nameOf), view, chartWidth(),
                                CHARTS.map((d) => kinds[d.id].map((ks) => ks.map((k) => k.label)))]);
  if (shape !== chartShape) { chartShape = shape; buildCharts(keys, kinds); }
  const weight = view.smooth;
  CHARTS.forEach((def) => {
    const tables = [];
    kinds[def.id].forEach((ks) => {
      ks.forEach((k) => tables.push(k.smooth && weight > 0 ? smoothed(k.points, weight) : k.points));
      if (weight > 0) ks.filter((k) => k.smooth).forEach((k) => tables.push(k.points));
    });
    const chart = charts[def.id];
    chart.setData(columns(tables));
    $(def.id).dataset.series = JSON.stringify(chart.series.slice(1).map((s) => s.label));
    $(def.id).dataset.runs = JSON.stringify(keys);
  });
  // Evaluations but no step rows (--watch, or a trainer without telemetry): a note, not empty boxes
  const rows = keys.some((k) => runOf(k).steps.length > 0), anyEvals = keys.some((k) => runOf(k).evals.length > 0);
  const noRows = !rows && anyEvals;
  $("no-telemetry").hidden = !noRows;
  CHARTS.filter((d) => d.needsRows).forEach((d) => { $(d.id).hidden = noRows; });
  const noRanks = rows && keys.every((k) => ranksOf(runOf(k), "rank_compute_s") === 0);
  $("chart-ranks").hidden = noRows || noRanks;
  $("no-ranks").hidden = !noRanks;
  $("no-evaluations").hidden = anyEvals || !rows;
  $("chart-lag").hidden = !anyEvals;
  timelineBars(keys);
  compareTable(keys);
  headline();
}

function scheduleRedraw() {
  if (!redrawPending) { redrawPending = true; requestAnimationFrame(redraw); }
}

// ------------------------------------------------------------------------------- per-rank timeline bars
// The newest --timeline window of each drawn run: one bar per rank, its phases' seconds stacked.
function timelineBars(keys) {
  const box = $("timeline");
  box.textContent = "";
  const withTimeline = keys.filter((k) => runOf(k).timeline);
  $("no-timeline").hidden = withTimeline.length > 0;
  withTimeline.forEach((key) => {
    const t = runOf(key).timeline;
    const head = document.createElement("h3");
    head.innerHTML = `<span class="swatch" style="background:${colourOf(key)}"></span>`;
    head.append(`${nameOf(key)}: steps ${t.step_from}–${t.step_to}`);
    box.appendChild(head);
    const total = (r) => PHASES.reduce((a, [p]) => a + (r.phases[p] || 0), 0);
    const top = Math.max(...t.ranks.map(total)) || 1;
    t.ranks.forEach((r) => {
      const row = document.createElement("div");
      row.className = "tl-row";
      const label = document.createElement("span");
      label.textContent = "rank " + r.rank;
      const track = document.createElement("div");
      track.className = "tl-track";
      PHASES.forEach(([p, colour]) => {
        const v = r.phases[p] || 0;
        if (v <= 0) return;
        const seg = document.createElement("div");
        seg.className = "tl-seg";
        seg.dataset.phase = p;
        seg.style.width = (100 * v / top) + "%";
        seg.style.background = colour;
        seg.title = `rank ${r.rank} ${p}: ${v.toFixed(4)} s`;
        track.appendChild(seg);
      });
      const num = document.createElement("span");
      num.textContent = `${total(r).toFixed(3)} s` + (r.phases.sum ? ` (sums ${r.phases.sum.toFixed(3)} s)` : "");
      row.append(label, track, num);
      box.appendChild(row);
    });
  });
  if (withTimeline.length) {
    const legend = document.createElement("div");
    legend.className = "tl-legend dim";
    PHASES.forEach(([p, colour]) => { legend.insertAdjacentHTML("beforeend", `<span class="swatch" style="background:${colour}"></span>${p} `); });
    box.appendChild(legend);
  }
}

// -------------------------------------------------------------------------------- hyperparameters, diff
function compareTable(keys) {
  const table = $("compare");
  table.textContent = "";
  const configs = keys.map((k) => runOf(k).config || {});
  const names = Array.from(new Set(configs.flatMap(Object.keys))).sort();
  $("compare-note").textContent = names.length ? (keys.length > 1 ? "rows marked ≠ differ" : "choose runs in the list to compare them")
    : "no configuration yet";
  if (!names.length) return;
  const head = table.insertRow();
  head.appendChild(document.createElement("th"));
  keys.forEach((k) => {
    const th = document.createElement("th");
    th.innerHTML = `<span class="swatch" style="background:${colourOf(k)}"></span>`;
    th.append(nameOf(k));
    head.appendChild(th);
  });
  names.forEach((n) => {
    const values = configs.map((c) => JSON.stringify(c[n]));
    const tr = table.insertRow();
    const differs = new Set(values).size > 1;
    tr.dataset.param = n;
    if (differs) tr.className = "differs";
    const th = document.createElement("th");
    th.innerHTML = differs ? '<span class="marker" title="differs">≠</span> ' : "";
    th.append(n);
    tr.appendChild(th);
    values.forEach((v) => { tr.insertCell().textContent = v === undefined ? "–" : v; });
  });
}

// -------------------------------------------------------------------------------------------- headline
// The epoch a step belongs to, from 1: the step row at or after it says (an evaluation's checkpoint counts
// the epochs done, which is the same number at an epoch's end; rows, when there are some, settle it).
function epochOf(s, step, fallback) {
  const r = s.steps.find((x) => x.step >= step);
  return r && r.step - (r.steps || 1) < step ? r.epoch : fallback;
}

function headline() {
  const s = steps[steps.length - 1], e = evals[evals.length - 1], run = focused ? runOf(focused) : null;
  const parts = [];
  if (s) parts.push(`step ${s.step} (epoch ${s.epoch}): train loss ${fmt(s.loss)}, ${Math.round(s.images_per_s)} images/s`);
  if (e) parts.push((e.val_accuracy !== null && e.val_accuracy !== undefined ? `validation accuracy ${pct(e.val_accuracy)}, ` : "") +
                    `test accuracy ${pct(e.test_accuracy ?? e.accuracy)} at step ${e.step} (epoch ${epochOf(run, e.step, e.epoch)})` +
                    (e.final ? ", final" : ""));
  $("headline").textContent = parts.join(" · ") || "waiting for the trainer…";
}

// ----------------------------------------------------------------------------------------------- runs
function saveChoice() {
  localStorage.setItem("lenet.chosen", JSON.stringify(Array.from(chosen)));
}

function showRuns(runs) {
  runsList = runs;
  const table = $("runs");
  table.textContent = "";
  const head = table.insertRow();
  ["", "run", "status", "evaluations", "last step", "best validation accuracy", "its test accuracy"].forEach((t) => {
    const th = document.createElement("th"); th.textContent = t; head.appendChild(th);
  });
  runs.forEach((r) => {
    const tr = table.insertRow();
    tr.dataset.run = r.key;
    if (r.key === focused) tr.className = "shown";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = chosen.has(r.key) || r.key === focused;
    box.disabled = r.key === focused;
    box.title = r.key === focused ? "the focused run is always drawn" : "overlay this run on the charts";
    box.setAttribute("aria-label", "overlay " + r.name);
    box.addEventListener("change", () => {
      if (box.checked) { chosen.add(r.key); load(r.key); } else chosen.delete(r.key);
      saveChoice();
      scheduleRedraw();
    });
    tr.insertCell().appendChild(box);
    const name = document.createElement("button");
    name.type = "button";
    name.className = "run-name";
    name.title = `focus ${r.name} (${r.key}): headline, checkpoint, drawing`;
    name.innerHTML = `<span class="swatch" style="background:${colourOf(r.key)}"></span>`;
    name.append(r.name);
    name.addEventListener("click", () => focus(r.key, true));
    tr.insertCell().appendChild(name);
    [r.status, r.evaluations, r.last_step ?? "–", pct(r.best_val_accuracy), pct(r.best_test_accuracy)]
      .forEach((v) => { tr.insertCell().textContent = v; });
  });
  $("runs-note").textContent = runs.length ? "" : "no run evaluated yet";
  if (focused) {                            // a run's name may come after its key (the list arrives later)
    $("run-name").textContent = nameOf(focused);
    document.title = `${nameOf(focused)} · lenet-dist dashboard`;
  }
  drawn().forEach(load);
  scheduleRedraw();
}

// Focus a run: its headline, its newest checkpoint's panels, its models for drawing.
async function focus(key, byHand) {
  if (byHand) localStorage.setItem("lenet.focus", key);
  if (key === focused) return;
  focused = key;
  steps = runOf(key).steps;                 // the globals follow the focus at once (tests read them)
  evals = runOf(key).evals;
  $("run-name").textContent = nameOf(key);
  document.title = `${nameOf(key)} · lenet-dist dashboard`;
  document.querySelectorAll("#runs tr[data-run]").forEach((tr) => {
    tr.className = tr.dataset.run === key ? "shown" : "";
    const box = tr.querySelector("input");
    box.disabled = tr.dataset.run === key;
    box.checked = box.disabled || chosen.has(tr.dataset.run);
  });
  $("draw-run").textContent = nameOf(key);
  await load(key);
  scheduleRedraw();
  if (!runOf(key).hasCheckpoint) {          // (a restarted evaluator has none until the run's next evaluation)
    $("ckpt-title").textContent = `${nameOf(key)}: no checkpoint evaluated by this evaluator yet`;
    return;
  }
  try {
    showCheckpoint(await getJSON("/api/checkpoint" + q(key)));
    if (mapsOfTestImage) showDigit($("digit-index").value);
  } catch (err) {
    $("ckpt-title").textContent = err.message;
  }
}

function showRun(run) {                    // the evaluator shows this run first: focus it unless one was chosen
  if (!run) return;
  shownKey = run.key;
  const mine = localStorage.getItem("lenet.focus");
  if (!mine || mine === run.key || !runsList.some((r) => r.key === mine)) focus(run.key, false);
}

// ------------------------------------------------------------------------------------- checkpoint view
function showCheckpoint(c) {
  const s = runOf(c.run || focused);
  $("ckpt-title").textContent = `${nameOf(c.run || focused)}, step ${c.step} (epoch ${epochOf(s, c.step, c.epoch)}): ` +
    `test accuracy ${pct(c.accuracy)}, loss ${fmt(c.loss)}` + (c.final ? ", final" : "");
  const table = $("confusion");
  table.textContent = "";
  const head = table.insertRow();
  head.appendChild(document.createElement("th"));
  for (let p = 0; p < 10; p++) { const th = document.createElement("th"); th.textContent = p; head.appendChild(th); }
  c.confusion.forEach((row, t) => {
    const tr = table.insertRow();
    const th = document.createElement("th"); th.textContent = t; tr.appendChild(th);
    const total = row.reduce((a, b) => a + b, 0) || 1;
    row.forEach((n, p) => {
      const td = tr.insertCell();
      td.textContent = n || "";
      const share = n / total;
      td.style.background = t === p ? `rgba(42,111,219,${share})` : `rgba(224,101,58,${Math.min(1, 4 * share)})`;
      if (share > 0.6) td.style.color = "#fff";
      td.title = `true ${t}, predicted ${p}: ${n}`;
    });
  });
  bars($("per-class"), c.per_class, null);
  const filters = $("filters");
  filters.textContent = "";
  c.conv1_filters.forEach((f, i) => {
    const flat = f.flat();
    const top = Math.max(...flat.map(Math.abs)) || 1;
    filters.appendChild(tile(greyCanvas(flat.map((v) => Math.round(255 * v / top)), 5, 5, 9, true), "filter " + i));
  });
  const worst = $("worst");
  worst.textContent = "";
  c.worst.forEach((w) => {
    const t = tile(greyCanvas(bytes(w.pixels), 28, 28, 2), `${w.label} → ${w.predicted} (${Math.round(100 * w.confidence)}%)`);
    t.title = `test image ${w.index}`;
    t.addEventListener("click", () => { $("digit-index").value = w.index; showDigit(w.index); });
    worst.appendChild(t);
  });
}

function bars(el, values, highlight) {
  el.textContent = "";
  values.forEach((v, k) => {
    const label = document.createElement("span"); label.textContent = k;
    const track = document.createElement("div");
    const bar = document.createElement("div");
    bar.className = "bar" + (k === highlight ? " top" : "");
    bar.style.width = Math.max(1, 160 * (v || 0)) + "px";
    track.appendChild(bar);
    const num = document.createElement("span"); num.textContent = v === null ? "–" : pct(v);
    el.append(label, track, num);
  });
}

// --------------------------------------------------------------------------------------- feature maps
function showMaps(seen, title) {
  $("features-title").textContent = title;
  const m1 = $("maps1"), m2 = $("maps2");
  m1.textContent = ""; m2.textContent = "";
  m1.appendChild(tile(greyCanvas(bytes(seen.input), 28, 28, 2), "input"));
  const c1 = bytes(seen.conv1.pixels), c2 = bytes(seen.conv2.pixels);
  for (let k = 0; k < 6; k++) m1.appendChild(tile(greyCanvas(c1.subarray(784 * k, 784 * (k + 1)), 28, 28, 2), "map " + k));
  for (let k = 0; k < 16; k++) m2.appendChild(tile(greyCanvas(c2.subarray(100 * k, 100 * (k + 1)), 10, 10, 5), "map " + k));
}

async function showDigit(index) {
  const ticket = ++mapsTicket;
  try {
    const d = await getJSON("/api/digit/" + encodeURIComponent(index) + q(focused));
    if (ticket !== mapsTicket) return;                 // a drawing (or another digit) came since
    mapsOfTestImage = true;
    showMaps(d, `test image ${d.index} (label ${d.label}), seen by ${nameOf(focused)} at step ${d.step}: predicted ${d.predicted}`);
  } catch (err) {
    if (ticket === mapsTicket) $("features-title").textContent = err.message;
  }
}

// ----------------------------------------------------------------------------------------- draw a digit
function setupPad() {
  const pad = $("pad"), ctx = pad.getContext("2d");
  let drawing = false, timer = null;
  pad.dataset.strokes = 0;                          // strokes on the pad; each prediction says which it saw
  const clear = () => { ctx.fillStyle = "#000"; ctx.fillRect(0, 0, pad.width, pad.height); };
  clear();
  ctx.strokeStyle = "#fff"; ctx.lineWidth = 18; ctx.lineCap = "round"; ctx.lineJoin = "round";
  const at = (e) => { const r = pad.getBoundingClientRect(); return [(e.clientX - r.left) * pad.width / r.width, (e.clientY - r.top) * pad.height / r.height]; };
  pad.addEventListener("pointerdown", (e) => {
    drawing = true; pad.setPointerCapture(e.pointerId);
    const [x, y] = at(e); ctx.beginPath(); ctx.moveTo(x, y); ctx.lineTo(x + 0.01, y); ctx.stroke();
  });
  pad.addEventListener("pointermove", (e) => {
    if (!drawing) return;
    const [x, y] = at(e); ctx.lineTo(x, y); ctx.stroke();
  });
  const end = () => {
    if (!drawing) return;
    drawing = false;
    pad.dataset.strokes = Number(pad.dataset.strokes) + 1;
    mapsOfTestImage = false; mapsTicket++;            // the maps are the drawing's now: no test image over it
    clearTimeout(timer); timer = setTimeout(predict, 250);
  };
  pad.addEventListener("pointerup", end);
  pad.addEventListener("pointercancel", end);
  $("clear").addEventListener("click", () => { clear(); pad.dataset.strokes = 0; $("prediction").textContent = "draw a digit"; $("probs").textContent = ""; });
  $("which").addEventListener("change", predict);
}

// A prediction can come back after a later one was asked for (a slow reply to a half-drawn digit): only the
// newest request's reply is shown, tagged with the number of strokes it saw and the run whose model saw it.
let predictions = 0;
function predict() {
  const ticket = ++predictions, strokes = $("pad").dataset.strokes, maps = ++mapsTicket, key = focused;
  $("pad").toBlob(async (blob) => {
    try {
      const r = await getJSON("/api/predict?model=" + $("which").value + (key ? "&run=" + encodeURIComponent(key) : ""),
                              { method: "POST", headers: { "Content-Type": "image/png" }, body: blob });
      if (ticket !== predictions) return;
      const seen = $("seen"), sctx = seen.getContext("2d");
      sctx.imageSmoothingEnabled = false;
      sctx.drawImage(greyCanvas(bytes(r.input), 28, 28, 1), 0, 0, seen.width, seen.height);
      $("prediction").textContent = `${r.predicted}  (${pct(r.probabilities[r.predicted])}, ${nameOf(key)}'s ${r.model} checkpoint, step ${r.step})`;
      $("prediction").dataset.predicted = r.predicted;
      $("prediction").dataset.strokes = strokes;
      $("prediction").dataset.run = key || "";
      bars($("probs"), r.probabilities, r.predicted);
      if (maps === mapsTicket) {
        mapsOfTestImage = false;
        showMaps(r, `the drawn digit, seen by ${nameOf(key)} at step ${r.step}: predicted ${r.predicted}`);
      }
    } catch (err) {
      if (ticket === predictions) $("prediction").textContent = err.message;
    }
  }, "image/png");
}

// -------------------------------------------------------------------------------------------- controls
function setupView() {
  $("log-loss").checked = view.log;
  $("smooth").value = view.smooth;
  $("smooth-value").textContent = view.smooth.toFixed(2);
  $("log-loss").addEventListener("change", () => {
    view.log = $("log-loss").checked; localStorage.setItem("lenet.log", view.log ? "1" : "0"); scheduleRedraw();
  });
  $("smooth").addEventListener("input", () => {
    view.smooth = Number($("smooth").value);
    $("smooth-value").textContent = view.smooth.toFixed(2);
    localStorage.setItem("lenet.smooth", String(view.smooth));
    scheduleRedraw();
  });
  let resizing = null;
  window.addEventListener("resize", () => { clearTimeout(resizing); resizing = setTimeout(scheduleRedraw, 150); });
}

// ------------------------------------------------------------------------------------------ live feed
function connect() {
  const source = new EventSource("/api/stream");
  source.addEventListener("open", async () => {
    $("status").textContent = "live";
    try {                                     // another server (the evaluator restarted): start afresh
      const s = await getJSON("/api/state");
      if (serverStarted !== null && s.started !== serverStarted) location.reload();
    } catch (err) { /* the next open asks again */ }
  });
  source.addEventListener("error", () => { $("status").textContent = "reconnecting…"; });
  source.addEventListener("reload", () => location.reload());   // too far behind to replay: start afresh
  source.addEventListener("steps", (m) => {
    const rows = JSON.parse(m.data), byRun = new Map();
    rows.forEach((r) => { const k = r.run || focused; if (!byRun.has(k)) byRun.set(k, []); byRun.get(k).push(r); });
    byRun.forEach((rs, k) => addRows(k, rs));
    if (!focused && byRun.size) focus(byRun.keys().next().value, false);   // rows before any run is named
    scheduleRedraw();
  });
  source.addEventListener("runs", (m) => showRuns(JSON.parse(m.data)));
  source.addEventListener("run", (m) => showRun(JSON.parse(m.data)));
  source.addEventListener("evaluation", (m) => { addEvaluation(JSON.parse(m.data)); scheduleRedraw(); });
  source.addEventListener("checkpoint", (m) => {
    const c = JSON.parse(m.data);
    runOf(c.run || focused).hasCheckpoint = true;
    if ((c.run || focused) !== focused) return;
    showCheckpoint(c);
    if (mapsOfTestImage) showDigit($("digit-index").value);     // the chosen digit, through the new weights
  });
}

async function start() {
  setupView();
  setupPad();
  $("show-digit").addEventListener("click", () => showDigit($("digit-index").value));
  connect();                                   // events from now on; the history below fills what came before
  const [state, runs] = await Promise.all([getJSON("/api/state"), getJSON("/api/runs")]);
  serverStarted = state.started;
  runsList = runs.runs;
  const mine = localStorage.getItem("lenet.focus");
  const first = runsList.some((r) => r.key === mine) ? mine : (runs.shown_key || state.key);
  shownKey = runs.shown_key || state.key;
  if (chosen.size === 0 && first) chosen.add(first);
  if (first) await focus(first, false);
  showRuns(runsList);
  scheduleRedraw();
}

start().catch((err) => { $("status").textContent = "error: " + err.message; });
