"""Two runs compared in a real browser (issue 22's "done means"): two real trainers (the shipped subset,
different learning rates and names) followed by ONE evaluator with --http. Both are listed and overlaid on the
charts, their hyperparameters side by side with the lr row marked; the evaluator is killed (SIGKILL) and
started again mid-run: the page left open comes back with the full history and no line across the gap; after
both runs end the page and drawing a digit still work, for each run, and nothing overflows at 400 px."""
import base64
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

from tests.mpiutil import REPO, env  # noqa: E402
from tests.test_browser import browser, draw, js, severe, strokes, until  # noqa: E402,F401 (fixture)
from tests.test_e2e import finish, free_port, start_trainer  # noqa: E402

RUNS = {"a": ("lr-0.05", "0.05", 2), "b": ("lr-0.02", "0.02", 0)}      # --run-name, --lr, ranks (0: one process)


def start_evaluator(tmp_path, endpoints, port, n):
    log = open(tmp_path / f"evaluator{n}.log", "w")
    cmd = [sys.executable, "-m", "workers.evaluator", "--subset", "--poll-ms", "200", "--report",
           str(tmp_path / "eval.jsonl"), "--http", f"127.0.0.1:{port}"]
    for e in endpoints:
        cmd += ["--connect", e]
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=log)


def port_free(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def reports(tmp_path):
    path = tmp_path / "eval.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def page_evals(driver, key):
    return js(driver, f"return (series[{json.dumps(key)}] || {{evals: []}}).evals.map(e => [e.step, e.evaluator])")


def column(driver, chart, label):
    """The x values and the named series' values of a chart on the page."""
    return js(driver, f"const c = charts[{json.dumps(chart)}]; const i = c.series.findIndex(s => s.label === "
                      f"{json.dumps(label)}); return i < 0 ? null : [c.data[0], c.data[i]]")


def test_two_runs_compared_through_an_evaluator_restart(tmp_path, browser):  # noqa: F811 (fixture)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    endpoints = {k: f"tcp://127.0.0.1:{free_port()}" for k in RUNS}
    client = httpx.Client(base_url=url, timeout=10)

    def get(path):
        try:
            r = client.get(path)
            return r.json() if r.status_code == 200 else None
        except httpx.TransportError:
            return None

    ev = start_evaluator(tmp_path, endpoints.values(), port, 1)
    trainers = {}
    try:
        for k, (name, lr, ranks) in RUNS.items():
            folder = tmp_path / k
            folder.mkdir()
            trainers[k] = start_trainer(endpoints[k], folder, "--run-name", name, "--lr", lr, "--log-every", "4",
                                        "--val-size", "200", "--linger", "120", ranks=ranks, epochs=30, name=k)
        runs = until("both runs listed", lambda: (lambda r: r if r and len(r["runs"]) == 2 else None)(get("/api/runs")))
        # over a socket a run is named by its id's first 8 characters; the report says which trainer served it
        by_source = until("both runs in the report", lambda: (lambda m: m if len(m) == 2 else None)(
            {r["source"]: r["run_id"] for r in reports(tmp_path)}))
        keys = {k: by_source[endpoints[k]] for k in RUNS}
        names = {k: next(r["name"] for r in runs["runs"] if r["key"] == keys[k]) for k in RUNS}
        key_a, key_b = keys["a"], keys["b"]
        browser.get(url)
        until("the page's runs", lambda: js(browser, "return document.querySelectorAll('#runs tr[data-run]').length") == 2)

        # both runs overlaid: tick the one that is not focused
        # (the list is redrawn after every evaluation: the click is made in the page, at once)
        js(browser, "document.querySelector('#runs tr[data-run] input:not([disabled])').click()")
        until("both runs on every chart", lambda: all(
            set(json.loads(js(browser, f"return document.getElementById('{c}').dataset.runs") or "[]")) == {key_a, key_b}
            for c in ("chart-loss", "chart-acc", "chart-speed", "chart-lr", "chart-lag")))
        labels = json.loads(js(browser, "return document.getElementById('chart-acc').dataset.series"))
        assert {f"{names['a']} validation", f"{names['b']} validation", f"{names['a']} test"} <= set(labels)
        until("both runs' curves drawn", lambda: all(
            (lambda c: c and sum(v is not None for v in c[1]) > 0)(column(browser, "chart-loss", f"{names[k]} train"))
            for k in RUNS))
        # the hyperparameters side by side, the learning rate's row marked as differing (class and marker)
        differs = until("the lr row marked", lambda: js(
            browser, "return [...document.querySelectorAll('#compare tr.differs')].map(t => t.dataset.param)"))
        assert "lr" in differs and "epochs" not in differs
        assert js(browser, "return document.querySelector('#compare tr[data-param=lr] .marker').textContent") == "≠"
        # per-rank seconds of the 2-rank run
        until("per-rank compute seconds", lambda: (lambda c: c and any(v is not None for v in c[1]))(
            column(browser, "chart-ranks", f"{names['a']} rank 1 compute")))

        # the evaluator killed mid-run, and started again
        # (mid-run: no final checkpoint evaluated; a trainer that ends meanwhile serves its final one --linger s)
        runs = until("an evaluation of each run", lambda: (lambda r: r if all(x["evaluations"] >= 1 for x in r) else None)(
            get("/api/runs")["runs"]))
        assert [r["status"] for r in runs] == ["running", "running"], runs
        ev.send_signal(signal.SIGKILL)
        ev.wait(30)
        until("the old dashboard gone", lambda: port_free(port), timeout=30)
        before = {k: [r["step"] for r in reports(tmp_path) if r["run_id"] == keys[k]] for k in RUNS}
        old = {r["evaluator"] for r in reports(tmp_path)}
        ev = start_evaluator(tmp_path, endpoints.values(), port, 2)
        for k, key in (("a", key_a), ("b", key_b)):
            got = until(f"run {k}: an evaluation by the new evaluator on the page left open", lambda: (
                lambda e: e if any(ev_ not in old for _, ev_ in e) else None)(page_evals(browser, key)), timeout=120)
            steps = [s for s, _ in got]
            assert set(before[k]) <= set(steps), f"evaluations made before the restart missing: {before[k]} vs {steps}"
        # no line across the gap: between the last step evaluated before the kill and the first after, a null
        until("the charts redrawn", lambda: column(browser, "chart-acc", f"{names['a']} test"))
        for k in RUNS:
            evals = page_evals(browser, keys[k])
            last_old = max(s for s, e in evals if e in old)
            first_new = min(s for s, e in evals if e not in old)
            xs, ys = column(browser, "chart-acc", f"{names[k]} test")
            between = [y for x, y in zip(xs, ys) if last_old < x < first_new]
            assert None in between, f"run {k}: a line from step {last_old} to {first_new} across the restart"

        # both runs end; the page and drawing still work for each
        for k, p in trainers.items():
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, f"trainer {k}: {err[-2000:]}"
        until("both runs finished", lambda: [r["status"] for r in get("/api/runs")["runs"]] == ["finished"] * 2,
              timeout=120)
        for k in RUNS:
            key = keys[k]
            js(browser, f"document.querySelector('#runs tr[data-run=\"{key}\"] button.run-name').click()")
            until(f"run {k} focused", lambda: js(browser, "return focused") == key)
            for index in range(300):
                d = client.get(f"/api/digit/{index}", params={"run": key}).json()
                if d["predicted"] == d["label"] and max(d["probabilities"]) > 0.95 and d["label"] != 1:
                    break
            u8 = np.frombuffer(base64.b64decode(d["input"]), np.uint8).reshape(28, 28)
            browser.find_element("id", "clear").click()
            pad = browser.find_element("id", "pad")
            browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", pad)
            paths = strokes(u8)
            draw(browser, pad, paths)
            until(f"run {k}'s model classifies the drawing", lambda: js(
                browser, "const p = document.getElementById('prediction').dataset; return [p.strokes, p.run]")
                == [str(len(paths)), key], timeout=30)
            predicted = js(browser, "return document.getElementById('prediction').dataset.predicted")
            assert int(predicted) == d["label"], f"run {k}: drew a {d['label']}, the page says {predicted}"

        # a 400 px viewport (Chromium's windows are at least 500 px wide: the viewport is emulated)
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                {"width": 400, "height": 900, "deviceScaleFactor": 1, "mobile": False})
        until("no horizontal overflow at 400 px", lambda: js(
            browser, "return window.innerWidth <= 400 && document.documentElement.scrollWidth <= window.innerWidth"))
        # while no server listened the page's requests were refused: expected; nothing else
        assert [e for e in severe(browser) if not ("ERR_CONNECTION_REFUSED" in e["message"] or
                                                   "/api/stream" in e["message"])] == []
    finally:
        for p in (*trainers.values(), ev):
            if p.poll() is None:
                p.terminate()
        for p in (*trainers.values(), ev):
            try:
                p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        for n in (1, 2):
            log = tmp_path / f"evaluator{n}.log"
            if log.exists():
                print(f"--- evaluator {n}\n" + log.read_text()[-3000:])
