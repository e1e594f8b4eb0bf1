"""The stop request under a scheduler, for real: `mpirun -n 2 lenet-train` whose ranks get what Slurm sends
at a time limit (SIGTERM, SIGCONT, SIGTERM) or as its `--signal=B:USR1@90` warning. Every rank must stop
after the same step with the stop checkpoint written, never take the second SIGTERM for "stop now"."""
import os
import signal
import subprocess
import sys
import time

import pytest

from lenet_dist.checkpoints import format as checkpoint
from lenet_dist.run.procs import local_ranks

from tests.mpiutil import REPO, env, mpirun_cmd, python

TRAIN = ["--subset", "--val-size", "0", "--batch-size", "50", "--checkpoint-every", "10", "--no-progress",
         "--epochs", "50", "--stall-timeout", "30"]


def start(tmp_path):
    ckpt = tmp_path / "ckpt"
    cmd = [*mpirun_cmd(2), python(), "-m", "workers.trainer", *TRAIN, "--checkpoint-dir", str(ckpt)]
    p = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not checkpoint.list_checkpoints(ckpt):        # every rank is in the loop, its handlers installed
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.05)
    ranks = local_ranks(p.pid)
    assert len(ranks) == 2, ranks
    return p, ckpt, ranks


@pytest.mark.parametrize("sequence", [
    [signal.SIGTERM, signal.SIGCONT, signal.SIGTERM],     # Slurm at the time limit
    [signal.SIGUSR1],                                      # Slurm's --signal=B:USR1@90 warning, passed on
    [signal.SIGUSR1, signal.SIGTERM, signal.SIGCONT, signal.SIGTERM]])   # the warning, then the limit
def test_a_slurm_time_limit_yields_the_stop_checkpoint_on_every_rank(tmp_path, sequence):
    p, ckpt, ranks = start(tmp_path)
    for s in sequence:
        if s == signal.SIGTERM:
            time.sleep(0.01)                # as at a real limit, each arrives after the handler has run
        for pid in ranks:
            try:
                os.kill(pid, s)
            except ProcessLookupError:
                pass
    try:
        out, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        raise AssertionError("the job did not stop: " + "".join(p.communicate()))
    first = sequence[0]
    # the ranks exit 128 + N; Hydra passes that on as N, or as 15 when it ends a rank still finalizing
    assert p.returncode not in (0, 130), err
    assert "KeyboardInterrupt" not in err and "interrupted" not in err, err
    assert err.count(f"stopped by signal {int(first)} at step") == 2, err      # both ranks, the same step
    step, path = checkpoint.list_checkpoints(ckpt)[0]
    assert checkpoint.load_file(path).step == step > 0
    assert f"at step {step} " in err and f"checkpoint {path} written" in err, err


def test_the_launcher_passes_on_one_stop_however_many_signals_it_gets(tmp_path):
    from tests.test_launch import TRAIN as LAUNCH_TRAIN, Launch
    job = Launch(tmp_path, ["-n", 2], [*LAUNCH_TRAIN, "--epochs", "50"])
    job.wait_for("the first of this start")
    job.wait_for_checkpoint(10)
    for s in (signal.SIGTERM, signal.SIGCONT, signal.SIGTERM, signal.SIGTERM):
        job.proc.send_signal(s)
        time.sleep(0.05)
    assert job.finish() == 128 + signal.SIGTERM, job.text
    assert job.text.count("passed SIGTERM on to 2 local rank(s)") == 1, job.text
    assert job.text.count("stopped by signal 15 at step") == 2 and "SIGINT" not in job.text, job.text
    end = job.rows()[-1]
    assert end["outcome"] == "stopped" and checkpoint.list_checkpoints(job.ckpt)[0][0] == end["step"] > 10
