"""lenet-train --metrics-port: rank 0's own /metrics, scraped from a real `mpirun -n 2` run while it trains and
a real evaluator reports to it, parsed by prometheus_client's parser (names, types, run and rank labels);
a port it cannot have, or a bad or public address, is one line. --log-format json: every line of the
trainer's log is a JSON object with an ISO 8601 time and its zone."""
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime

from prometheus_client.parser import text_string_to_metric_families

from tests.mpiutil import env, mpirun_cmd, python, REPO
from tests.test_e2e import free_port

TYPES = {"lenet_trainer_steps": "counter", "lenet_trainer_examples": "counter", "lenet_trainer_epoch": "gauge",
         "lenet_trainer_loss": "gauge", "lenet_trainer_accuracy_ratio": "gauge",
         "lenet_trainer_learning_rate": "gauge", "lenet_trainer_images_per_second": "gauge",
         "lenet_trainer_ranks": "gauge", "lenet_trainer_compute_seconds": "counter",
         "lenet_trainer_wait_seconds": "counter", "lenet_trainer_evaluator_lag_steps": "gauge",
         "lenet_trainer_evaluator_lag_seconds": "gauge", "lenet_trainer_start_time_seconds": "gauge"}


def get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.headers["Content-Type"], r.read().decode()


def scrape(port):
    status, kind, text = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200 and kind.startswith("text/plain; version=0.0.4")
    return {f.name: f for f in text_string_to_metric_families(text)}


def complete(fams):
    """The scrape once training, both ranks' seconds and an evaluator's result are in it."""
    ranks = {s.labels.get("rank") for s in fams["lenet_trainer_compute_seconds"].samples}
    ok = (fams["lenet_trainer_steps"].samples and fams["lenet_trainer_steps"].samples[0].value > 0
          and ranks == {"0", "1"} and fams["lenet_trainer_evaluator_lag_steps"].samples
          and fams["lenet_trainer_loss"].samples)
    return fams if ok else None


def test_metrics_scraped_while_two_ranks_train(tmp_path):
    endpoint, port = f"tcp://127.0.0.1:{free_port()}", free_port()
    report = tmp_path / "eval.jsonl"
    ev_err, tr_err = open(tmp_path / "ev.txt", "w"), open(tmp_path / "tr.txt", "w")
    ev = subprocess.Popen([sys.executable, "-m", "workers.evaluator", "--connect", endpoint, "--subset", "--report",
                           str(report), "--poll-ms", "100", "--exit-after-run"], cwd=REPO, env=env(),
                          stdout=subprocess.DEVNULL, stderr=ev_err)
    tr = subprocess.Popen([*mpirun_cmd(2), python(), "-m", "workers.trainer", "--subset", "--epochs", "60",
                           "--checkpoint-dir", str(tmp_path / "myrun"), "--checkpoint-every", "10",
                           "--publish", endpoint, "--metrics-port", str(port), "--no-progress", "--linger", "0"],
                          cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=tr_err)
    try:
        fams, deadline = None, time.monotonic() + 240
        while fams is None and tr.poll() is None and time.monotonic() < deadline:
            try:
                fams = complete(scrape(port))
                health = get(f"http://127.0.0.1:{port}/healthz")
                ready = get(f"http://127.0.0.1:{port}/readyz")
            except OSError:
                pass
            time.sleep(0.2)
        training = tr.poll() is None                    # the scrape was made while it trained
    finally:
        tr.send_signal(signal.SIGTERM)
        tr.wait(120)
        ev.send_signal(signal.SIGTERM)
        ev.wait(60)
    assert fams is not None, (tmp_path / "tr.txt").read_text() + (tmp_path / "ev.txt").read_text()
    assert training
    assert {name: f.type for name, f in fams.items()} == TYPES
    assert health[0] == 200 and ready[0] == 200 and json.loads(ready[2])["status"] == "ready"
    run_id = json.loads(report.read_text().splitlines()[0])["run_id"]
    for f in fams.values():
        for s in f.samples:
            assert s.labels["run"] == "myrun" and s.labels["run_id"] == run_id, s
    steps = fams["lenet_trainer_steps"].samples[0]
    assert steps.name == "lenet_trainer_steps_total" and steps.value >= 1
    assert fams["lenet_trainer_ranks"].samples[0].value == 2
    for family in ("lenet_trainer_compute_seconds", "lenet_trainer_wait_seconds"):
        per_rank = {s.labels["rank"]: s for s in fams[family].samples}
        assert set(per_rank) == {"0", "1"} and all(s.name == family + "_total" for s in per_rank.values())
        assert all(s.value >= 0 for s in per_rank.values())
    assert sum(s.value for s in fams["lenet_trainer_compute_seconds"].samples) > 0
    assert 0 < fams["lenet_trainer_loss"].samples[0].value < 10
    assert 0 <= fams["lenet_trainer_accuracy_ratio"].samples[0].value <= 1
    assert fams["lenet_trainer_images_per_second"].samples[0].value > 0
    assert fams["lenet_trainer_evaluator_lag_steps"].samples[0].value >= 0
    assert 0 <= fams["lenet_trainer_evaluator_lag_seconds"].samples[0].value < 240
    examples = fams["lenet_trainer_examples"].samples[0]
    assert examples.name == "lenet_trainer_examples_total" and examples.value >= 64 * steps.value - 64 * 30


def train(tmp_path, *flags):
    return subprocess.run([sys.executable, "-m", "workers.trainer", "--subset", "--epochs", "1", "--no-save",
                           "--no-progress", *flags], cwd=tmp_path, env=env(), capture_output=True, text=True,
                          timeout=180)


def test_a_port_it_cannot_have_or_a_bad_address_is_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = train(tmp_path, "--metrics-port", str(port), "--log-level", "WARNING")
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    (line,) = p.stderr.splitlines()
    assert f"--metrics-port {port}: cannot serve on 127.0.0.1:" in line and "in use" in line
    for flags, said in ((["--metrics-port", "99999"], "expected [HOST:]PORT"),
                        (["--metrics-port", "0.0.0.0:0"], "add --metrics-public"),
                        (["--metrics-public"], "--metrics-public needs --metrics-port")):
        p = train(tmp_path, *flags)
        assert p.returncode == 2 and len(p.stderr.splitlines()) == 1 and said in p.stderr, p.stderr


def test_json_log_lines(tmp_path):
    p = train(tmp_path, "--log-format", "json", "--metrics-port", "0", "--progress", "--progress-every", "0")
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) >= 4
    for line in lines:
        row = json.loads(line)
        assert {"time", "level", "message"} <= set(row) and row["level"] in ("INFO", "WARNING")
        when = datetime.fromisoformat(row["time"])
        assert when.tzinfo is not None and abs(time.time() - when.timestamp()) < 600
    messages = [json.loads(line)["message"] for line in lines]
    assert any(m.startswith("Prometheus metrics on http://127.0.0.1:") for m in messages)
    assert any(m.startswith("step ") and "images/s" in m for m in messages)    # the progress lines too


def test_json_log_lines_of_lenet_launch_and_its_ranks(tmp_path):
    p = subprocess.run([sys.executable, "-m", "workers.launch", "-n", "2", "--mpirun", mpirun_cmd(2)[0],
                        "--log-format", "json", "--", "--subset", "--epochs", "1", "--checkpoint-dir",
                        str(tmp_path / "ckpt"), "--no-progress"], cwd=tmp_path, env=env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stderr.splitlines()]
    assert {r["process"] for r in rows} == {"lenet-launch", "rank 0/2"}
    for r in rows:
        assert datetime.fromisoformat(r["time"]).tzinfo is not None and r["level"] and r["message"]
    assert any("--log-format=json" in r["message"] for r in rows if r["process"] == "lenet-launch")
