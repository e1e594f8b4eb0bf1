"""The dashboard of an evaluator that outlives its runs: one run at a time, never two as one series; every
run listed (/api/runs: name, status, best validation accuracy); a restarted evaluator shows the shown
run's history from its --report before it evaluates anything. Real processes, a real TrainerLink."""
import json
import signal
import subprocess
import sys

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

from lenet_dist.checkpoints import format as checkpoint  # noqa: E402
from lenet_dist.data import load_subset  # noqa: E402
from lenet_dist.data.identity import data_record  # noqa: E402
from lenet_dist.nn.model import NUM_PARAMS  # noqa: E402
from lenet_dist.transport import TrainerLink  # noqa: E402

from tests.fakes import make_params  # noqa: E402
from tests.mpiutil import REPO, env  # noqa: E402
from tests.test_browser import until  # noqa: E402
from tests.test_e2e import finish, free_port  # noqa: E402
from tests.test_evaluator_daemon import run_ckpt  # noqa: E402


def daemon(report, port, endpoint, *argv):
    return subprocess.Popen([sys.executable, "-m", "workers.evaluator", "--subset", "--poll-ms", "100",
                             "--connect", endpoint, "--report", str(report), "--http", f"127.0.0.1:{port}",
                             *map(str, argv)],
                            cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def get(c, path):
    try:
        r = c.get(path)
        return r.json() if r.status_code == 200 else None
    except httpx.TransportError:
        return None


def test_two_runs_on_one_endpoint_are_two_series_and_survive_a_restart(tmp_path):
    report, port = tmp_path / "eval.jsonl", free_port()
    c = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    with TrainerLink("tcp://127.0.0.1:*") as link:
        endpoint = link.endpoint
        ev = daemon(report, port, endpoint)
        try:
            link.publish(10, 0, run_ckpt(10, "aaaaaaaa-first", seed=0))
            until("run a's first evaluation", lambda: (get(c, "/api/history") or {}).get("evaluations"))
            link.publish(20, 0, run_ckpt(20, "aaaaaaaa-first", final=True, seed=0), final=True)
            until("run a finished", lambda: [r["status"] for r in (get(c, "/api/runs") or {}).get("runs", [])]
                  == ["finished"])
        except BaseException:
            ev.kill()
            raise
    with TrainerLink(endpoint) as link:             # the next run, on the same port
        try:
            link.publish(5, 0, run_ckpt(5, "bbbbbbbb-second", seed=1))
            h = until("run b on the page", lambda: (lambda h: h if h and [e["step"] for e in h["evaluations"]] == [5]
                                                    else None)(get(c, "/api/history")))
            state = get(c, "/api/state")
            assert state["run"]["run_id"] == "bbbbbbbb-second" and state["run"]["name"] == "bbbbbbbb"
            runs = get(c, "/api/runs")
            assert [(r["name"], r["status"], r["evaluations"]) for r in runs["runs"]] == [
                ("aaaaaaaa", "finished", 2), ("bbbbbbbb", "running", 1)]
            assert runs["runs"][0]["best_val_accuracy"] is None or 0 <= runs["runs"][0]["best_val_accuracy"] <= 1
            one = [1.0 if 10 <= i % 28 <= 14 and 4 <= i // 28 <= 24 else 0.0 for i in range(784)]   # a stroke
            assert c.post("/api/predict", json={"pixels": one}).json()["step"] == 5     # b's model draws
            link.publish(8, 0, run_ckpt(8, "bbbbbbbb-second", seed=1))
            until("b's second evaluation", lambda: len(get(c, "/api/history")["evaluations"]) == 2)
        finally:
            ev.send_signal(signal.SIGTERM)
            rc, out, err = finish(ev)
        assert rc == 0, err
        ev = daemon(report, port, endpoint.replace(endpoint.rsplit(":", 1)[1], str(free_port())))  # no trainer
        try:
            h = until("the history of run b after the restart",
                      lambda: (lambda h: h if h and h["evaluations"] else None)(get(c, "/api/history")))
            assert [e["step"] for e in h["evaluations"]] == [5, 8] and h["evaluations"][0]["test_accuracy"] is not None
            assert [r["name"] for r in get(c, "/api/runs")["runs"]] == ["aaaaaaaa", "bbbbbbbb"]
            assert get(c, "/api/state")["run"]["name"] == "bbbbbbbb"
        finally:
            ev.send_signal(signal.SIGTERM)
            rc, out, err = finish(ev)
        assert rc == 0, err


def test_a_restarted_evaluator_draws_with_the_finished_runs_best_model(tmp_path):
    """The trainer is gone after its run; the evaluator restarted: the page still draws, with --best-dir's
    best checkpoint of the run it shows."""
    data = load_subset()
    split = data_record(data.identity(), len(data.train_images), 200, seed=0)     # a validation split: a best

    def ckpt(step, final=False):
        meta = {"step": step, "epoch": 0, "pos": 0, "final": final, "config": {"seed": step}, "data": split,
                "run_id": "cccccccc-third"}
        return checkpoint.to_bytes(make_params(step), np.zeros(NUM_PARAMS, np.float32), meta)
    report, port = tmp_path / "eval.jsonl", free_port()
    argv = ["--best-dir", tmp_path / "best"]
    c = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    one = [1.0 if 10 <= i % 28 <= 14 and 4 <= i // 28 <= 24 else 0.0 for i in range(784)]
    with TrainerLink("tcp://127.0.0.1:*") as link:
        ev = daemon(report, port, link.endpoint, *argv)
        try:
            link.publish(10, 0, ckpt(10))
            link.publish(20, 0, ckpt(20, final=True), final=True)
            until("the run finished", lambda: [r["status"] for r in (get(c, "/api/runs") or {}).get("runs", [])]
                  == ["finished"])
            best_step = json.loads((tmp_path / "best" / "best.json").read_text())["step"]
        finally:
            ev.send_signal(signal.SIGTERM)
            rc, out, err = finish(ev)
        assert rc == 0, err
        endpoint = link.endpoint
    ev = daemon(report, port, endpoint, *argv)     # no trainer behind it any more
    try:
        until("the history", lambda: (lambda h: h if h and h["evaluations"] else None)(get(c, "/api/history")))
        got = until("a drawing classified", lambda: (lambda r: r.json() if r.status_code == 200 else None)(
            c.post("/api/predict?model=best", json={"pixels": one})), timeout=20)
        assert got["step"] == best_step
        # the restored model added no evaluation
        assert len(get(c, "/api/history")["evaluations"]) == len(report.read_text().splitlines())
    except BaseException:
        ev.send_signal(signal.SIGTERM)
        print(finish(ev)[2])
        raise
    ev.send_signal(signal.SIGTERM)
    rc, out, err = finish(ev)
    assert rc == 0, err
    assert "drawing with the best checkpoint of run cccccccc" in err, err


def test_two_trainers_at_once_never_mix_their_step_rows(tmp_path):
    """Two --connect: the page shows the newest run to start, with its own trainer's step rows only; the
    other run's later evaluations are listed, not shown."""
    port = free_port()
    c = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    with TrainerLink("tcp://127.0.0.1:*") as a, TrainerLink("tcp://127.0.0.1:*") as b:
        for k in range(1, 6):
            a.telemetry({"event": "step", "step": k, "epoch": 0, "loss": 1.0, "acc": 0.5, "lr": 0.1})
            b.telemetry({"event": "step", "step": 100 + k, "epoch": 0, "loss": 9.0, "acc": 0.1, "lr": 0.9})
        ev = daemon(tmp_path / "eval.jsonl", port, a.endpoint, "--connect", b.endpoint)
        try:
            a.publish(5, 0, run_ckpt(5, "aaaaaaaa-a"))
            until("run a on the page", lambda: (get(c, "/api/state") or {}).get("run"))
            b.publish(105, 0, run_ckpt(105, "bbbbbbbb-b", seed=1))
            until("both runs listed", lambda: len((get(c, "/api/runs") or {}).get("runs", [])) == 2)
            h = until("run b's step rows", lambda: (lambda h: h if h and len(h["steps"]) == 5 else None)(
                get(c, "/api/history")))
            assert [r["step"] for r in h["steps"]] == [101, 102, 103, 104, 105] and {r["lr"] for r in h["steps"]} == {0.9}
            assert [e["step"] for e in h["evaluations"]] == [105] and get(c, "/api/state")["run"]["name"] == "bbbbbbbb"
            a.publish(10, 0, run_ckpt(10, "aaaaaaaa-a"))            # run a goes on: listed, not shown
            until("a's second evaluation", lambda: [r["evaluations"] for r in get(c, "/api/runs")["runs"]] == [2, 1])
            h = get(c, "/api/history")
            assert [e["step"] for e in h["evaluations"]] == [105] and {r["lr"] for r in h["steps"]} == {0.9}
        finally:
            ev.send_signal(signal.SIGTERM)
            rc, out, err = finish(ev)
        assert rc == 0, err
