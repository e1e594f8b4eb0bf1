"""The dashboard of an evaluator that outlives its runs: one run at a time, never two as one series; every
run listed (/api/runs: name, status, best validation accuracy); a restarted evaluator shows the shown
run's history from its --report before it evaluates anything. Real processes, a real TrainerLink."""
import signal
import subprocess
import sys

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

from lenet_dist.transport import TrainerLink  # noqa: E402

from .mpiutil import REPO, env  # noqa: E402
from .test_browser import until  # noqa: E402
from .test_e2e import finish, free_port  # noqa: E402
from .test_evaluator_daemon import run_ckpt  # noqa: E402


def daemon(report, port, endpoint):
    return subprocess.Popen([sys.executable, "-m", "workers.evaluator", "--subset", "--poll-ms", "100",
                             "--connect", endpoint, "--report", str(report), "--http", f"127.0.0.1:{port}"],
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
