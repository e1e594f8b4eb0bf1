"""lenet-evaluator as a daemon that outlives its runs: after a run's final checkpoint it keeps serving and
evaluates the next run on the same endpoint or folder, each result naming its run; --exit-after-run keeps
the one-run behaviour. Real processes, a real TrainerLink on 127.0.0.1, real checkpoint folders."""
import json
import signal
import subprocess
import sys
import time

import numpy as np

from lenet_dist.checkpoints import folder as ckptdir, format as checkpoint
from lenet_dist.nn.model import NUM_PARAMS
from lenet_dist.transport import TrainerLink

from tests.fakes import make_params
from tests.mpiutil import env
from tests.test_evaluator import Evaluator


def meta(step, run_id, final=False, seed=0):
    return {"step": step, "epoch": 0, "pos": 0, "final": final, "config": {"seed": seed}, "run_id": run_id}


def run_ckpt(step, run_id, final=False, seed=0):
    return checkpoint.to_bytes(make_params(seed), np.zeros(NUM_PARAMS, np.float32), meta(step, run_id, final, seed))


def save(folder, step, run_id, final=False, seed=0):
    ckptdir.save(folder, make_params(seed), np.zeros(NUM_PARAMS, np.float32), meta(step, run_id, final, seed))


class Daemon(Evaluator):
    """lenet-evaluator without --exit-after-run."""

    def __init__(self, tmp_path, *args):
        Evaluator.count += 1
        self.report = tmp_path / f"report{Evaluator.count}.jsonl"
        self.err_path = tmp_path / f"stderr{Evaluator.count}.txt"
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "workers.evaluator", "--report", str(self.report),
                                          "--subset", "--poll-ms", "100", *map(str, args)], cwd=tmp_path,
                                         stdout=subprocess.PIPE, stderr=err, text=True, env=env())

    def wait_for_rows(self, check, timeout=60):
        deadline = time.monotonic() + timeout
        while not check(self.lines()):
            assert time.monotonic() < deadline and self.proc.poll() is None, self.stderr
            time.sleep(0.1)


def test_the_next_run_on_the_same_endpoint_is_evaluated_and_keyed_by_its_run(tmp_path):
    with TrainerLink("tcp://127.0.0.1:*") as link:
        endpoint = link.endpoint
        ev = Daemon(tmp_path, "--connect", endpoint)
        link.publish(20, 0, run_ckpt(20, "run-aaaa-1111", final=True), final=True)
        ev.wait_for("run run-aaaa finished at step 20; waiting for the next run", timeout=60)
    with TrainerLink(endpoint) as link:             # a new trainer on the same port: another run, fewer steps
        link.publish(10, 0, run_ckpt(10, "run-bbbb-2222", seed=1))
        ev.wait_for("a new run on", timeout=60)
        link.publish(15, 0, run_ckpt(15, "run-bbbb-2222", final=True, seed=1), final=True)
        ev.wait_for("run run-bbbb finished at step 15", timeout=60)
    assert ev.proc.poll() is None, ev.stderr
    ev.proc.send_signal(signal.SIGTERM)
    code, _ = ev.finish()
    assert code == 0, ev.stderr
    rows = ev.lines()
    assert [(r["run_id"], r["run"], r["step"]) for r in rows] == [
        ("run-aaaa-1111", "run-aaaa", 20), ("run-bbbb-2222", "run-bbbb", 10), ("run-bbbb-2222", "run-bbbb", 15)]


def test_watch_follows_each_run_folder_and_stays(tmp_path):
    runs = tmp_path / "runs"
    for name, run_id, seed in (("lr-0.1", "id-one", 0), ("lr-0.05", "id-two", 1)):
        save(runs / name, 30, run_id, final=True, seed=seed)
    ev = Daemon(tmp_path, "--watch", runs)
    ev.wait_for("run lr-0.1 finished", timeout=60)
    ev.wait_for("run lr-0.05 finished", timeout=60)
    save(runs / "late", 5, "id-three")              # a run folder that appears later
    ev.wait_for_rows(lambda rows: any(r["run"] == "late" for r in rows))
    ev.proc.send_signal(signal.SIGTERM)
    assert ev.finish()[0] == 0, ev.stderr
    assert sorted(r["run"] for r in ev.lines()) == ["late", "lr-0.05", "lr-0.1"]
    assert {r["run"]: r["run_id"] for r in ev.lines()} == {"late": "id-three", "lr-0.05": "id-two", "lr-0.1": "id-one"}


def test_exit_after_run_exits_after_the_final_checkpoint(tmp_path):
    with TrainerLink("tcp://127.0.0.1:*") as link:
        ev = Evaluator(tmp_path, "--connect", link.endpoint)    # with --exit-after-run
        link.publish(20, 0, run_ckpt(20, "run-aaaa", final=True), final=True)
        code, _ = ev.finish(timeout=60)
    assert code == 0 and "exiting (--exit-after-run)" in ev.stderr, ev.stderr
    assert [json.dumps(r["step"]) for r in ev.lines()] == ["20"]


def test_a_run_is_named_by_the_name_its_checkpoints_carry(tmp_path):
    trained = subprocess.run([sys.executable, "-m", "workers.trainer", "--subset", "--epochs", "1", "--train-subset",
                              "300", "--run-name", "exp-b", "--no-progress"], cwd=tmp_path, env=env(),
                             capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr
    assert checkpoint.load_file(tmp_path / "runs" / "exp-b" / "last.npz").meta["run_name"] == "exp-b"
    with TrainerLink("tcp://127.0.0.1:*") as link:       # a trainer over a socket names its run by its folder's name
        ev = Daemon(tmp_path, "--connect", link.endpoint)
        named = dict(meta(20, "run-cccc-3333", final=True), run_name="exp-a")
        link.publish(20, 0, checkpoint.to_bytes(make_params(0), np.zeros(NUM_PARAMS, np.float32), named), final=True)
        ev.wait_for("run exp-a finished at step 20", timeout=60)
    ev.proc.send_signal(signal.SIGTERM)
    code, _ = ev.finish()
    assert code == 0, ev.stderr
    assert [(r["run_id"], r["run"]) for r in ev.lines()] == [("run-cccc-3333", "exp-a")]
