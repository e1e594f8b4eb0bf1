"""lenet-evaluator's history and /metrics: every evaluation is kept by run in its --report and read back at
start, so a restarted evaluator knows each run it evaluated and its counters carry on; /metrics on --health
follows Prometheus' conventions (parsed by prometheus_client's own parser: names, types, labels), with
the validation figures and the time of the last evaluation per run. Real processes, a real TrainerLink."""
import json
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lenet_dist.evaluation.history import History
from lenet_dist.transport import TrainerLink

from tests.mpiutil import env
from tests.test_e2e import free_port
from tests.test_evaluator_daemon import run_ckpt


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return {f.name: f for f in text_string_to_metric_families(r.read().decode())}


def start(tmp_path, report, port, endpoint):
    err = open(tmp_path / f"err{port}.txt", "w")
    return subprocess.Popen([sys.executable, "-m", "workers.evaluator", "--subset", "--poll-ms", "100", "--report",
                             str(report), "--health", f"127.0.0.1:{port}", "--connect", endpoint],
                            stdout=subprocess.DEVNULL, stderr=err, env=env(), text=True), tmp_path / f"err{port}.txt"


def until(what, check, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = check()
        except OSError:
            got = None
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"gave up waiting for {what}")


def by_run(family, run):
    return [s for s in family.samples if s.labels.get("run") == run]


def test_metrics_by_run_survive_a_restart(tmp_path):
    report = tmp_path / "eval.jsonl"
    with TrainerLink("tcp://127.0.0.1:*") as link:
        link.publish(20, 0, run_ckpt(20, "aaaaaaaa-one", final=True), final=True)
        port = free_port()
        ev, err = start(tmp_path, report, port, link.endpoint)
        try:
            until("run one's evaluation", lambda: "finished at step 20" in err.read_text())
            link.close()
        finally:
            ev.send_signal(signal.SIGTERM)
            assert ev.wait(30) == 0, err.read_text()
    with TrainerLink("tcp://127.0.0.1:*") as link:   # the evaluator restarted; another run
        link.publish(10, 0, run_ckpt(10, "bbbbbbbb-two", seed=1))
        port = free_port()
        ev, err = start(tmp_path, report, port, link.endpoint)
        try:
            until("run two's evaluation", lambda: len(report.read_text().splitlines()) == 2)
            before = time.time()
            fams = until("/metrics", lambda: scrape(port))
            assert "history: 1 evaluations of 1 run(s)" in err.read_text()
        finally:
            ev.send_signal(signal.SIGTERM)
            assert ev.wait(30) == 0, err.read_text()
    types = {name: f.type for name, f in fams.items()}
    assert types == {
        "lenet_evaluator_evaluations": "counter", "lenet_evaluator_evaluation_seconds": "counter",
        "lenet_evaluator_last_evaluation_timestamp_seconds": "gauge", "lenet_evaluator_step": "gauge",
        "lenet_evaluator_lag_steps": "gauge", "lenet_evaluator_val_accuracy_ratio": "gauge",
        "lenet_evaluator_val_loss": "gauge", "lenet_evaluator_test_accuracy_ratio": "gauge",
        "lenet_evaluator_test_loss": "gauge", "lenet_evaluator_best_val_accuracy_ratio": "gauge",
        "lenet_evaluator_best_step": "gauge", "lenet_evaluator_run_finished": "gauge",
        "lenet_evaluator_runs": "gauge", "lenet_evaluator_ready": "gauge",
        "lenet_evaluator_heartbeat_age_seconds": "gauge", "lenet_evaluator_start_time_seconds": "gauge"}
    (one,) = by_run(fams["lenet_evaluator_evaluations"], "aaaaaaaa")       # from the report: survived the restart
    assert one.name == "lenet_evaluator_evaluations_total" and one.value == 1
    assert one.labels == {"run": "aaaaaaaa", "run_id": "aaaaaaaa-one"}
    (two,) = by_run(fams["lenet_evaluator_evaluations"], "bbbbbbbb")
    assert two.value == 1
    rows = {r["run_id"]: r for r in map(json.loads, report.read_text().splitlines())}
    for run, run_id in (("aaaaaaaa", "aaaaaaaa-one"), ("bbbbbbbb", "bbbbbbbb-two")):
        r = rows[run_id]
        assert by_run(fams["lenet_evaluator_test_accuracy_ratio"], run)[0].value == pytest.approx(r["test_accuracy"])
        assert by_run(fams["lenet_evaluator_step"], run)[0].value == r["step"]
        assert by_run(fams["lenet_evaluator_last_evaluation_timestamp_seconds"], run)[0].value == \
            pytest.approx(r["time"])
    assert by_run(fams["lenet_evaluator_run_finished"], "aaaaaaaa")[0].value == 1
    assert by_run(fams["lenet_evaluator_run_finished"], "bbbbbbbb")[0].value == 0
    assert by_run(fams["lenet_evaluator_last_evaluation_timestamp_seconds"], "bbbbbbbb")[0].value <= before
    assert fams["lenet_evaluator_runs"].samples[0].value == 2


def test_history_keeps_runs_apart_and_skips_what_is_not_a_result(tmp_path):
    report = tmp_path / "eval.jsonl"
    rows = [{"run_id": "r1", "run": "a", "step": 10, "accuracy": 0.5, "loss": 1.0, "val_accuracy": 0.6,
             "val_loss": 0.9, "eval_seconds": 0.5, "final": False, "time": 1.0},     # the older names
            {"run_id": "r2", "run": "b", "step": 5, "test_accuracy": 0.7, "test_loss": 0.8, "val_accuracy": 0.9,
             "val_loss": 0.3, "eval_seconds": 0.25, "final": True, "time": 2.0},
            {"run_id": "r1", "run": "a", "step": 20, "test_accuracy": 0.8, "val_accuracy": 0.55, "eval_seconds": 0.5,
             "final": False, "time": 3.0},
            {"run_id": "r1", "run": "a", "step": 20, "test_accuracy": 0.8, "val_accuracy": 0.55, "eval_seconds": 0.5,
             "final": True, "time": 4.0}]            # a restarted evaluator scored step 20 again
    report.write_text("".join(json.dumps(r) + "\n" for r in rows) + "junk\n[1]\n" + '{"step": 30, "ru')
    said = []
    h = History.load(report, warn=said.append)
    assert [(r.name, [e["step"] for e in r.evaluations], r.count) for r in h.runs()] == [
        ("a", [10, 20], 3), ("b", [5], 1)]
    a, b = h.runs()
    assert a.evaluations[0]["test_accuracy"] == 0.5 and a.best["step"] == 10 and a.finished and b.finished
    assert a.to_dict()["best_val_accuracy"] == 0.6 and b.to_dict()["status"] == "finished"
    assert said == [f"history: 3 line(s) of {report} are not evaluation results: skipped"]
    assert History.load(tmp_path / "none.jsonl", warn=said.append).runs() == []
