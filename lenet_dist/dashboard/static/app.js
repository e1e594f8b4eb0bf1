// The dashboard page: fetches /api/state, /api/history and /api/checkpoint once, then follows /api/stream
// (server-sent events) for new telemetry rows, evaluations and checkpoint analyses. Charts by uPlot.
"use strict";

const steps = [];          // telemetry rows from the trainer, by step
const evals = [];          // evaluator results, by step
const charts = {};
let redrawPending = false;
let mapsOfTestImage = true;   // the feature maps show a test image (else the drawn digit)
let mapsTicket = 0;           // every request that would redraw the maps takes one; only the newest may

const $ = (id) => document.getElementById(id);
const fmt = (v, d = 4) => (v === null || v === undefined ? "–" : Number(v).toFixed(d));
const pct = (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(2) + "%");

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

// ---------------------------------------------------------------------------------------------- charts
function makeChart(id, title, series, yLabel) {
  const el = $(id);
  const opts = {
    title, width: 420, height: 220,
    scales: { x: { time: false } },
    axes: [{ label: "step" }, { label: yLabel, size: 60 }],
    // spanGaps false: a null (a gap in the data, see gapped) breaks the line; undefined (no point of this
    // series at another series' step) is stepped over
    series: [{ label: "step" }].concat(series.map((s) => Object.assign({ spanGaps: false, width: 1.5 }, s))),
    legend: { live: false },
  };
  charts[id] = new uPlot(opts, [[]].concat(series.map(() => [])), el);
}

function setupCharts() {
  makeChart("chart-loss", "Loss", [
    { label: "train", stroke: "#2a6fdb" },
    { label: "test", stroke: "#e0653a", points: { show: true, size: 6 } },
    { label: "validation", stroke: "#1e9e6a", dash: [6, 3], points: { show: true, size: 6 } }], "loss");
  makeChart("chart-acc", "Accuracy", [
    { label: "train", stroke: "#2a6fdb" },
    { label: "test", stroke: "#e0653a", points: { show: true, size: 6 } },
    { label: "validation", stroke: "#1e9e6a", dash: [6, 3], points: { show: true, size: 6 } }], "fraction");
  makeChart("chart-speed", "Images/s", [{ label: "total", stroke: "#333" }], "images/s");
  makeChart("chart-lr", "Learning rate", [{ label: "lr", stroke: "#7a3fbf" }], "lr");
  makeChart("chart-lag", "Evaluator lag", [{ label: "steps behind", stroke: "#1e9e6a", points: { show: true, size: 6 } }], "steps");
}

// Rows keyed by step -> [xs, col1, col2...] over the union of steps (undefined where a series has no point:
// uPlot steps over it; a null is a gap and breaks the line).
function columns(tables) {
  const xs = Array.from(new Set(tables.flatMap((t) => t.map((p) => p[0])))).sort((a, b) => a - b);
  const index = new Map(xs.map((x, i) => [x, i]));
  const cols = tables.map((t) => { const c = new Array(xs.length).fill(undefined); t.forEach((p) => { c[index.get(p[0])] = p[1]; }); return c; });
  return [xs].concat(cols);
}

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

function ranksSeries() {
  const ranks = steps.reduce((n, r) => Math.max(n, (r.rank_images_per_s || []).length), 0);
  const chart = charts["chart-speed"];
  const colours = ["#2a6fdb", "#e0653a", "#1e9e6a", "#bf3f8f", "#c9a227", "#555"];
  while (chart.series.length < 2 + ranks) {
    const r = chart.series.length - 2;
    chart.addSeries({ label: "rank " + r, stroke: colours[r % colours.length], spanGaps: true, width: 1 });
  }
  return ranks;
}

function redraw() {
  redrawPending = false;
  const ev = evals.filter((e) => e.loss !== null);
  const val = evals.filter((e) => e.val_accuracy !== null && e.val_accuracy !== undefined);
  charts["chart-loss"].setData(columns([gapped(steps, (r) => r.loss), ev.map((e) => [e.step, e.loss]),
    val.filter((e) => e.val_loss !== null).map((e) => [e.step, e.val_loss])]));
  charts["chart-acc"].setData(columns([gapped(steps, (r) => r.acc), evals.map((e) => [e.step, e.accuracy]),
    val.map((e) => [e.step, e.val_accuracy])]));
  const ranks = ranksSeries();
  const speed = [gapped(steps, (r) => r.images_per_s)];
  for (let k = 0; k < ranks; k++) speed.push(gapped(steps, (r) => (r.rank_images_per_s || [])[k] ?? null));
  charts["chart-speed"].setData(columns(speed));
  charts["chart-lr"].setData(columns([gapped(steps, (r) => r.lr)]));
  charts["chart-lag"].setData(columns([evals.map((e) => [e.step, e.lag_steps])]));
  // Evaluations but no step rows (--watch, or a trainer without telemetry): a note, not two empty boxes
  const noRows = steps.length === 0 && evals.length > 0;
  $("no-telemetry").hidden = !noRows;
  ["chart-speed", "chart-lr"].forEach((id) => { $(id).hidden = noRows; });
  headline();
}

function scheduleRedraw() {
  if (!redrawPending) { redrawPending = true; requestAnimationFrame(redraw); }
}

function addSteps(rows) {
  const last = steps.length ? steps[steps.length - 1].step : -1;
  rows.filter((r) => r.step > last).forEach((r) => steps.push(r));
  if (rows.length && rows[rows.length - 1].config) showConfig(rows[rows.length - 1].config);
  scheduleRedraw();
}

function addEvaluation(e) {
  if (evals.some((x) => x.step === e.step && x.time === e.time)) return;
  evals.push(e);
  evals.sort((a, b) => a.step - b.step);
  scheduleRedraw();
}

function headline() {
  const s = steps[steps.length - 1], e = evals[evals.length - 1];
  const parts = [];
  if (s) parts.push(`step ${s.step} (epoch ${s.epoch}): train loss ${fmt(s.loss)}, ${Math.round(s.images_per_s)} images/s`);
  if (e) parts.push((e.val_accuracy !== null && e.val_accuracy !== undefined ? `validation accuracy ${pct(e.val_accuracy)}, ` : "") +
                    `test accuracy ${pct(e.accuracy)} at step ${e.step}`);
  $("headline").textContent = parts.join(" · ") || "waiting for the trainer…";
}

// The runs the evaluator knows (/api/runs): the shown one marked; the page shows one run at a time.
let shownRun = null;
function showRuns(runs) {
  const table = $("runs");
  table.textContent = "";
  const head = table.insertRow();
  ["run", "status", "evaluations", "last step", "best validation accuracy", "its test accuracy"].forEach((t) => {
    const th = document.createElement("th"); th.textContent = t; head.appendChild(th);
  });
  runs.forEach((r) => {
    const tr = table.insertRow();
    if (shownRun && r.run_id === shownRun.run_id && r.name === shownRun.name) tr.className = "shown";
    [r.name, r.status, r.evaluations, r.last_step ?? "–", pct(r.best_val_accuracy), pct(r.best_test_accuracy)]
      .forEach((v) => { tr.insertCell().textContent = v; });
    tr.title = r.run_id || "";
  });
  $("runs-note").textContent = runs.length ? "" : "no run evaluated yet";
}

function showRun(run) {
  shownRun = run;
  $("run-name").textContent = run ? run.name : "";
  document.title = run ? `${run.name} · lenet-dist dashboard` : "lenet-dist dashboard";
}

function showConfig(cfg) {
  if (!cfg) return;
  $("config").textContent = Object.entries(cfg).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join("  ");
}

// ------------------------------------------------------------------------------------- checkpoint view
function showCheckpoint(c) {
  $("ckpt-title").textContent = `step ${c.step}, epoch ${c.epoch}: accuracy ${pct(c.accuracy)}, loss ${fmt(c.loss)}` +
    (c.final ? " (final)" : "");
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
    const d = await getJSON("/api/digit/" + encodeURIComponent(index));
    if (ticket !== mapsTicket) return;                 // a drawing (or another digit) came since
    mapsOfTestImage = true;
    showMaps(d, `test image ${d.index} (label ${d.label}), seen by step ${d.step}: predicted ${d.predicted}`);
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
// newest request's reply is shown, tagged with the number of strokes it saw.
let predictions = 0;
function predict() {
  const ticket = ++predictions, strokes = $("pad").dataset.strokes, maps = ++mapsTicket;
  $("pad").toBlob(async (blob) => {
    try {
      const r = await getJSON("/api/predict?model=" + $("which").value, { method: "POST", headers: { "Content-Type": "image/png" }, body: blob });
      if (ticket !== predictions) return;
      const seen = $("seen"), sctx = seen.getContext("2d");
      sctx.imageSmoothingEnabled = false;
      sctx.drawImage(greyCanvas(bytes(r.input), 28, 28, 1), 0, 0, seen.width, seen.height);
      $("prediction").textContent = `${r.predicted}  (${pct(r.probabilities[r.predicted])}, ${r.model} checkpoint, step ${r.step})`;
      $("prediction").dataset.predicted = r.predicted;
      $("prediction").dataset.strokes = strokes;
      bars($("probs"), r.probabilities, r.predicted);
      if (maps === mapsTicket) {
        mapsOfTestImage = false;
        showMaps(r, `the drawn digit, seen by step ${r.step}: predicted ${r.predicted}`);
      }
    } catch (err) {
      if (ticket === predictions) $("prediction").textContent = err.message;
    }
  }, "image/png");
}

// ------------------------------------------------------------------------------------------ live feed
function connect() {
  const source = new EventSource("/api/stream");
  source.addEventListener("open", () => { $("status").textContent = "live"; });
  source.addEventListener("error", () => { $("status").textContent = "reconnecting…"; });
  source.addEventListener("reload", () => location.reload());   // too far behind to replay: start afresh
  source.addEventListener("steps", (m) => addSteps(JSON.parse(m.data)));
  source.addEventListener("runs", (m) => showRuns(JSON.parse(m.data)));
  source.addEventListener("run", (m) => showRun(JSON.parse(m.data)));
  source.addEventListener("evaluation", (m) => addEvaluation(JSON.parse(m.data)));
  source.addEventListener("checkpoint", (m) => {
    showCheckpoint(JSON.parse(m.data));
    if (mapsOfTestImage) showDigit($("digit-index").value);     // the chosen digit, through the new weights
  });
}

async function start() {
  setupCharts();
  setupPad();
  $("show-digit").addEventListener("click", () => showDigit($("digit-index").value));
  connect();                                   // events from now on; the history below fills what came before
  const [state, history, runs] = await Promise.all([getJSON("/api/state"), getJSON("/api/history"),
                                                     getJSON("/api/runs")]);
  showRun(state.run);
  showRuns(runs.runs);
  showConfig(state.config);
  addSteps(history.steps);
  history.evaluations.forEach(addEvaluation);
  if (state.evaluations > 0) {                 // (asking before would be a 404 in the console)
    showCheckpoint(await getJSON("/api/checkpoint"));
    showDigit($("digit-index").value);
  }
  headline();
}

start().catch((err) => { $("status").textContent = "error: " + err.message; });
