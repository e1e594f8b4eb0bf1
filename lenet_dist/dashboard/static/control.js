// The live-control panel (lenet-train --allow-control, lenet-evaluator --control-key-file): shown only while
// the evaluator says the shown run may be steered; each button is one POST /api/control, whose outcome
// (queued by the trainer, refused and why) comes back in GET /api/control's "last".
(function () {
  "use strict";
  const panel = document.getElementById("control");
  const status = document.getElementById("control-status");
  let lastId = null;

  async function send(action, value) {
    status.textContent = `${action}${value === null ? "" : " x" + value}: sending…`;
    try {
      const r = await fetch("/api/control", {
        method: "POST", credentials: "same-origin", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({action: action, value: value}),
      });
      const body = await r.json();
      if (!r.ok) {
        status.textContent = `${action}: refused by the dashboard: ${body.error}`;
        return;
      }
      lastId = body.id;
      status.textContent = `${action}${value === null ? "" : " x" + value}: sent to the evaluator…`;
    } catch (e) {
      status.textContent = `${action}: ${e}`;
    }
  }

  function show(s) {
    panel.hidden = !s.available;
    document.getElementById("control-why").textContent = s.available ? `run ${s.run_id}` : (s.reason || "");
    const last = s.last;
    if (last && last.id === lastId) {
      const what = `${last.action}${last.value === null ? "" : " x" + last.value}`;
      status.textContent = last.state === "queued" ? `${what}: taken by the trainer (applied after its next step)`
        : `${what}: ${last.state}${last.why ? ": " + last.why : ""}`;
      status.dataset.state = last.state;
    }
  }

  async function poll() {
    try {
      const r = await fetch("/api/control", {credentials: "same-origin"});
      if (r.ok) show(await r.json());
    } catch (e) { /* the dashboard restarts: the next poll tells */ }
    setTimeout(poll, 1000);
  }

  for (const b of panel.querySelectorAll("button[data-action]")) {
    b.addEventListener("click", () => {
      const factor = b.dataset.factor;
      send(b.dataset.action, factor === undefined ? null : Number(factor));
    });
  }
  document.getElementById("control-lr-apply").addEventListener("click", () => {
    send("lr_scale", Number(document.getElementById("control-lr").value));
  });
  poll();
})();
