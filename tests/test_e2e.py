"""The two services together, for real: `mpirun -n 2 lenet-train --publish` and `lenet-evaluator` processes
on loopback, in every start order, with either side killed and restarted."""
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.mpiutil import REPO, env, mpirun_cmd, python

# --stall-timeout: if the launcher misses a killed rank (--fault ...:exit), the survivor ends the job itself
TRAIN = ["--subset", "--val-size", "0",  # no held-out split: 40 steps an epoch
         "--batch-size", "50", "--checkpoint-every", "10", "--no-progress", "--log-level", "INFO",
         "--stall-timeout", "20"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_trainer(endpoint, tmp_path, *extra, ranks=2, epochs=3, name="t"):
    cmd = [sys.executable, "-m", "workers.trainer", *TRAIN, "--epochs", str(epochs), "--publish", endpoint,
           "--metrics", str(tmp_path / f"{name}.jsonl"), *map(str, extra)]
    if ranks:
        cmd = [*mpirun_cmd(ranks), python(), *cmd[1:]]
    return subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_evaluator(endpoint, report, *extra, daemon=False):
    """lenet-evaluator on `endpoint`; it exits after the run unless `daemon` (then it stays until stopped)."""
    once = [] if daemon else ["--exit-after-run"]
    cmd = [sys.executable, "-m", "workers.evaluator", "--connect", endpoint, "--subset", "--report", str(report),
           "--poll-ms", "200", "--timeout", "120", *once, *map(str, extra)]
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_serving(p, timeout=60):
    """Until the evaluator says it evaluates (stderr), so that a trainer started next cannot die before the
    evaluator listens (under load its start-up took longer than a trainer's 100 steps)."""
    seen = []

    def read():
        for line in p.stderr:
            seen.append(line)
            if "evaluating checkpoints from" in line:
                return
    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    assert any("evaluating checkpoints from" in line for line in seen), "".join(seen)


def finish(p, timeout=120):
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"{p.args[:4]} did not finish in {timeout}s\n{out}\n{err}")
    return p.returncode, out, err


def reports(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_reports(path, n, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(reports(path)) >= n:
            return reports(path)
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} evaluations in {path} after {timeout}s")


def check_final_agrees(tmp_path, report, name="t"):
    rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    final = [r for r in rows if r["event"] == "epoch"][-1]
    rows = reports(report)
    last = rows[-1]
    assert last["final"] and last["step"] == final["step"]
    assert last["accuracy"] == pytest.approx(final["test_acc"], abs=1e-12)   # same model, same 1,000 images
    assert 0.0 <= last["accuracy"] <= 1.0
    for key in ("step", "epoch", "accuracy", "loss", "eval_seconds", "lag_steps", "sha256"):
        assert key in last
    return final, rows


@pytest.mark.usefixtures("mpi_flavour")
def test_mpirun_trainer_with_evaluator_started_first(tmp_path):
    endpoint, report = f"tcp://127.0.0.1:{free_port()}", tmp_path / "eval.jsonl"
    ev = start_evaluator(endpoint, report)
    time.sleep(0.5)
    tr = start_trainer(endpoint, tmp_path)
    code, tout, err = finish(tr)
    assert code == 0, err
    ecode, out, eerr = finish(ev, timeout=60)
    assert ecode == 0, eerr                                  # exits by itself after the final checkpoint
    final, rows = check_final_agrees(tmp_path, report)
    assert final["ranks"] == 2
    assert f"evaluator: step {final['step']} accuracy" in err  # the trainer heard the verdict
    assert f"  evaluator: {100 * rows[-1]['accuracy']:.2f}% at step {final['step']}" in tout   # in its summary


def test_trainer_started_first(tmp_path):
    endpoint, report = f"tcp://127.0.0.1:{free_port()}", tmp_path / "eval.jsonl"
    tr = start_trainer(endpoint, tmp_path, epochs=20)
    for line in tr.stderr:                                   # the trainer is up and training...
        if "serving checkpoints on" in line:
            break
    ev = start_evaluator(endpoint, report)                   # ...before the evaluator starts
    assert finish(tr)[0] == 0
    assert finish(ev, timeout=60)[0] == 0
    check_final_agrees(tmp_path, report)


def test_evaluator_killed_and_restarted_mid_run(tmp_path):
    endpoint, report = f"tcp://127.0.0.1:{free_port()}", tmp_path / "eval.jsonl"
    ev = start_evaluator(endpoint, report)
    tr = start_trainer(endpoint, tmp_path, epochs=8, ranks=0)
    wait_for_reports(report, 1)
    ev.kill()
    ev.wait()
    first = reports(report)
    ev2 = start_evaluator(endpoint, report)
    assert finish(tr)[0] == 0
    assert finish(ev2, timeout=60)[0] == 0
    _, rows = check_final_agrees(tmp_path, report)
    assert len(rows) > len(first)
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps)                            # never goes back to stale checkpoints


def test_trainer_restarted_with_resume_while_evaluator_keeps_running(tmp_path):
    endpoint, report = f"tcp://127.0.0.1:{free_port()}", tmp_path / "eval.jsonl"
    ckpt = tmp_path / "ckpt"
    ev = start_evaluator(endpoint, report)
    wait_serving(ev)
    tr = start_trainer(endpoint, tmp_path, "--checkpoint-dir", ckpt, "--fault", "0:100:exit", epochs=4)
    code, _, _ = finish(tr)
    assert code != 0                                          # died at step 100
    assert ev.poll() is None                                  # the evaluator is still there
    seen = wait_for_reports(report, 1)
    assert max(r["step"] for r in seen) <= 100
    tr2 = start_trainer(endpoint, tmp_path, "--checkpoint-dir", ckpt, "--resume", epochs=4)
    code, _, err = finish(tr2)
    assert code == 0, err
    assert "resumed from" in err
    assert finish(ev, timeout=60)[0] == 0
    final, rows = check_final_agrees(tmp_path, report)
    assert final["step"] == 160 and rows[-1]["step"] == 160


def test_test_mode_runs_both_sides(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    p = subprocess.run([sys.executable, "-m", "workers.trainer", "--test-mode", "--no-progress",
                        "--metrics", str(tmp_path / "m.jsonl")], cwd=REPO, env=env(TMPDIR=scratch),
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "test mode: OK" in p.stdout
    assert "test mode: evaluator step 87" in p.stdout             # 3 epochs of 29 (1,834 not held out / 64)
    assert "lenet-test-mode-" in p.stdout and list(scratch.iterdir()) == []     # its temp folder is gone


def test_sigterm_stops_every_rank_after_the_same_step_with_a_checkpoint(tmp_path, mpi_flavour):
    ckpt = tmp_path / "ckpt"
    tr = start_trainer(f"tcp://127.0.0.1:{free_port()}", tmp_path, "--checkpoint-dir", ckpt, epochs=50)
    from lenet_dist.checkpoints import format as checkpoint
    deadline = time.monotonic() + 120                 # the first checkpoint: every rank is past its setup,
    while not checkpoint.list_checkpoints(ckpt):      # signal handlers installed, inside the training loop
        assert tr.poll() is None and time.monotonic() < deadline, "the trainer never wrote a checkpoint"
        time.sleep(0.05)
    # mpirun forwards it to the ranks; Open MPI's kills the job on SIGTERM, and forwards SIGUSR1 instead
    tr.send_signal(signal.SIGUSR1 if mpi_flavour.name == "openmpi" else signal.SIGTERM)
    code, _, err = finish(tr, timeout=30)
    assert code != 0 and "stopped by signal" in err
    step, path = checkpoint.list_checkpoints(ckpt)[0]
    assert checkpoint.load_file(path).step == step > 0       # a whole, valid checkpoint at the stop step
    assert f"at step {step}" in err


def test_evaluator_follows_a_new_run_that_starts_over(tmp_path):
    endpoint, report = f"tcp://127.0.0.1:{free_port()}", tmp_path / "eval.jsonl"
    ev = start_evaluator(endpoint, report)
    first = start_trainer(endpoint, tmp_path, "--fault", "0:100:exit", epochs=4, name="a", ranks=0)
    assert finish(first)[0] != 0
    wait_for_reports(report, 1)
    fresh = start_trainer(endpoint, tmp_path, epochs=1, name="b", ranks=0)   # a new run, from step 0 to 40
    assert finish(fresh)[0] == 0
    assert finish(ev, timeout=60)[0] == 0
    _, rows = check_final_agrees(tmp_path, report, name="b")
    assert rows[-1]["step"] == 40
