"""What the page that compares runs is fed: the trainer's event rows (lr, control, timeline) through the
--log-every sink and the timeline's window summary from a real `mpirun -n 2` run; the evaluator's history
keeping each run's rows in a file beside its report and reading them back; the dashboard's state keeping runs
apart (?run=KEY on the API, each run's models for drawing). Real files, a real uvicorn server, real MPI."""
import json

import numpy as np
import pytest

from lenet_dist.evaluation.history import History, rows_path
from lenet_dist.parallel.timeline import summarize
from lenet_dist.run.sinks import Sinks
from lenet_dist.run.telemetry import TelemetrySink

from tests.mpiutil import launch
from tests.test_dashboard import live  # noqa: F401 (fixture)
from tests.trained import data, one_blas_thread, trained  # noqa: F401 (fixtures)

BASE = ["--subset", "--no-progress", "--log-level", "WARNING", "--stall-timeout", "30"]


def result(run_id, step, evaluator="h:1", val=0.9):
    return {"run_id": run_id, "run": run_id[:8], "step": step, "epoch": 1, "val_accuracy": val, "val_loss": 0.3,
            "test_accuracy": 0.9, "test_loss": 0.3, "final": False, "time": float(step), "evaluator": evaluator}


def test_the_sink_forwards_lr_control_and_timeline_rows_to_its_event_outputs():
    rows, events = [], []
    sink = TelemetrySink(10, [rows.append], event_outputs=[events.append])
    sinks = Sinks([sink])
    lr = {"event": "lr", "step": 40, "lr": 0.01, "scale": 0.1}
    control = {"event": "control", "step": 41, "action": "pause", "value": None, "source": "page"}
    timeline = {"event": "timeline", "step": 70, "step_from": 51, "step_to": 70, "ranks": []}
    for row in (lr, control, timeline, {"event": "restart", "step": 3}, {"event": "lr"}):
        sinks.on_event(row)
    assert events == [lr, control, timeline] and rows == []      # other rows and rows without a step: not sent
    default = []
    TelemetrySink(10, [default.append]).on_event(lr)
    assert default == []                                        # only to the outputs named for them


def test_the_window_summary_sums_each_ranks_phases():
    ranks = [{"events": [(0, "step", 0.0, 1.0, None), (0, "data", 0.0, 0.1, None), (0, "forward", 0.1, 0.3, None),
                         (0, "backward", 0.3, 0.6, None), (0, "wait for sum", 0.6, 0.8, None),
                         (0, "update", 0.8, 0.9, None), (2, "sum fc1..fc3", 0.4, 0.7, None),
                         (0, "evaluate test", 1.0, 1.5, None)]},
             {"events": [(0, "wait for sum (owed)", 0.0, 0.25, None), (1, "sum all", 0.0, 0.5, None)]}]
    row = summarize(ranks, 51, 70)
    assert (row["event"], row["step"], row["step_from"], row["step_to"]) == ("timeline", 70, 51, 70)
    p0, p1 = row["ranks"][0]["phases"], row["ranks"][1]["phases"]
    assert p0 == pytest.approx({"data": 0.1, "forward": 0.2, "backward": 0.3, "wait": 0.2, "update": 0.1,
                                "sum": 0.3, "other": 0.5, "step": 1.0})
    assert p1["wait"] == pytest.approx(0.25) and p1["sum"] == pytest.approx(0.5) and p1["forward"] == 0
    json.dumps(row, allow_nan=False)


def test_a_real_two_rank_run_hands_its_timeline_window_to_the_metrics(tmp_path):
    metrics = tmp_path / "m.jsonl"
    launch(2, [*BASE, "--epochs", "1", "--batch-size", "64", "--timeline", tmp_path / "t.json", "--timeline-steps",
               "5:15", "--metrics", metrics, "--no-save"], cwd=tmp_path)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    windows = [r for r in rows if r.get("event") == "timeline"]
    assert len(windows) == 1, [r.get("event") for r in rows]
    w = windows[0]
    assert (w["step_from"], w["step_to"], w["step"]) == (6, 15, 15) and [r["rank"] for r in w["ranks"]] == [0, 1]
    for r in w["ranks"]:
        p = r["phases"]
        assert min(p["data"], p["forward"], p["backward"], p["update"], p["step"]) > 0, p
        assert p["forward"] + p["backward"] < p["step"]


def test_the_history_keeps_each_runs_rows_beside_the_report_and_reads_them_back(tmp_path):
    report = tmp_path / "eval.jsonl"
    assert rows_path(report) == tmp_path / "eval.rows.jsonl"
    h = History.load(report, warn=print)
    for r in (result("aaaaaaaa-1", 10), result("bbbbbbbb-2", 10)):
        h.add(r)
        with open(report, "a") as f:
            f.write(json.dumps(r) + "\n")
    a = [{"event": "step", "step": s, "loss": 1.0 / s, "config": {"lr": 0.05}} for s in (4, 8)]
    assert h.add_rows("aaaaaaaa-1", a) == a
    assert h.add_rows("aaaaaaaa-1", a + [{"event": "step", "step": 12}]) == [{"event": "step", "step": 12}]
    assert h.add_rows("aaaaaaaa-1", [{"event": "lr", "step": 9, "lr": 0.01}] * 2) == [{"event": "lr", "step": 9, "lr": 0.01}]
    assert h.add_rows("bbbbbbbb-2", [{"event": "timeline", "step": 20, "ranks": []}, {"event": "step", "step": 4}])
    assert h.add_rows("cccccccc-3", [{"event": "step", "step": 4}]) == []       # no evaluation names that run
    with open(rows_path(report), "a") as f:
        f.write('{"torn": \n')
    warned = []
    back = {r.key: r for r in History.load(report, warn=warned.append).runs()}
    a_run, b_run = back["aaaaaaaa-1"], back["bbbbbbbb-2"]
    assert [r["step"] for r in a_run.steps] == [4, 8, 12] and a_run.config == {"lr": 0.05}
    assert [m["step"] for m in a_run.marks] == [9] and a_run.timeline is None
    assert [r["step"] for r in b_run.steps] == [4] and b_run.timeline["step"] == 20
    assert len(warned) == 1 and "1 line(s)" in warned[0]
    assert a_run.evaluations[0]["evaluator"] == "h:1"           # the page breaks the line between two evaluators


def test_the_state_keeps_runs_apart_and_answers_for_any_of_them(live, data, trained):
    from lenet_dist.evaluation import analysis
    from tests.fakes import make_params
    state, c = live
    detail = analysis.analyse(trained, data.test_images, data.test_labels)
    for key, params in (("aaaaaaaa-1", trained.named_params()), ("bbbbbbbb-2", make_params(3))):
        state.start_run({"key": key, "run_id": key, "name": key[:8]}, [])
        state.add_steps([{"event": "step", "step": s, "run": key, "loss": 1.0} for s in (1, 2)] +
                        [{"event": "lr", "step": 2, "lr": 0.01, "run": key},
                         {"event": "control", "step": 2, "action": "pause", "run": key}])
        state.add_evaluation(result(key, 2), params, detail, {"lr": 0.05 if key[0] == "a" else 0.1})
    assert c.get("/api/state").json()["run"]["key"] == "bbbbbbbb-2"           # the newest run is shown
    a = c.get("/api/history", params={"run": "aaaaaaaa-1"}).json()
    assert [r["step"] for r in a["steps"]] == [1, 2] and a["config"] == {"lr": 0.05}
    assert [m["event"] for m in a["marks"]] == ["lr", "control"] and [e["step"] for e in a["evaluations"]] == [2]
    assert c.get("/api/history").json()["config"] == {"lr": 0.1}
    r = c.get("/api/history", params={"run": "nope"})
    assert r.status_code == 404 and "nope" in r.json()["error"]
    digit = data.test_images[0].astype(np.float64) / 255
    body = {"pixels": digit.ravel().tolist()}
    got = {k: c.post("/api/predict", params={"run": k}, json=body).json() for k in ("aaaaaaaa-1", "bbbbbbbb-2")}
    assert got["aaaaaaaa-1"]["run"] == "aaaaaaaa-1" and got["bbbbbbbb-2"]["run"] == "bbbbbbbb-2"
    assert got["aaaaaaaa-1"]["probabilities"] != got["bbbbbbbb-2"]["probabilities"]     # each run's own model
    assert c.get("/api/checkpoint", params={"run": "aaaaaaaa-1"}).json()["run"] == "aaaaaaaa-1"


def test_a_page_that_saw_the_unnamed_run_gets_the_run_it_became(live):
    """Rows before any evaluation names their run are shown as the unnamed run; once named, that run is gone,
    and a page that asked for it at that moment (its history, its state) gets the named run, never a 404."""
    state, c = live
    state.add_steps([{"event": "step", "step": s, "loss": 1.0} for s in (1, 2)])
    assert c.get("/api/state").json()["key"] == "unnamed"
    assert [r["step"] for r in c.get("/api/history", params={"run": "unnamed"}).json()["steps"]] == [1, 2]
    key = "aaaaaaaa-1"
    state.start_run({"key": key, "run_id": key, "name": "named"}, [])
    state.add_steps([{"event": "step", "step": s, "loss": 1.0, "run": key} for s in (1, 2, 3)])
    h = c.get("/api/history", params={"run": "unnamed"})
    assert h.status_code == 200 and h.json()["run"]["key"] == key and len(h.json()["steps"]) == 3
    assert c.get("/api/state", params={"run": "unnamed"}).json()["key"] == key
    assert c.get("/api/history", params={"run": "nope"}).status_code == 404


def test_a_real_runs_timeline_window_reaches_the_page_through_the_link(tmp_path):
    """`mpirun -n 2 lenet-train --timeline` publishing to one evaluator with --http: the window's summary
    travels with the step rows and the page's history of that run holds it (and the report's rows file)."""
    httpx = pytest.importorskip("httpx")
    from tests.test_browser import until
    from tests.test_dashboard_runs import daemon, get
    from tests.test_e2e import finish, free_port, start_trainer
    endpoint, port = f"tcp://127.0.0.1:{free_port()}", free_port()
    ev = daemon(tmp_path / "eval.jsonl", port, endpoint)
    tr = start_trainer(endpoint, tmp_path, "--timeline", tmp_path / "t.json", "--timeline-steps", "5:15",
                       "--log-every", "4", "--linger", "60", epochs=2)
    c = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    try:
        h = until("the timeline window on the page", lambda: (lambda h: h if h and h["timeline"] else None)(
            get(c, "/api/history")))
        assert (h["timeline"]["step_from"], h["timeline"]["step_to"]) == (6, 15)
        assert [r["rank"] for r in h["timeline"]["ranks"]] == [0, 1] and h["steps"]
        assert tr.wait(120) == 0
        kept = [json.loads(line) for line in (tmp_path / "eval.rows.jsonl").read_text().splitlines()]
        assert [r["step"] for r in kept if r.get("event") == "timeline"] == [15]
    finally:
        for p in (tr, ev):
            if p.poll() is None:
                p.terminate()
            finish(p)
