"""The contract between lenet-train and lenet-launch is the exit status (lenet_dist/run/exitcodes.py), tested
on both sides: the trainer ends with the status its failure means, and the launcher decides from the status
alone, whatever the wording of the trainer's error line. A checkpoint folder that turns read-only mid-run
ends the launch at once instead of spending every restart."""
import os
import subprocess

import pytest

from lenet_dist.run import exitcodes as X
from lenet_dist.run.restart_policy import classify, RestartPolicy

from tests.idxdata import write_dir
from tests.mpiutil import launch
from tests.test_checkpoint_dir import tmpfs
from tests.test_launch import TRAIN, Launch

SMALL = ["--subset", "--train-subset", "300", "--batch-size", "50", "--epochs", "1", "--no-progress"]


# ------------------------------------------------------------------------------------- the trainer's side

def test_a_training_errors_status_comes_from_its_kind_never_from_its_wording():
    from lenet_dist.parallel.step import TrainingError
    assert X.status_for(TrainingError("loss went to nan", kind="diverged")) == X.DIVERGED
    assert X.status_for(TrainingError("checksums differ", kind="replicas")) == X.REPLICAS
    # the words that once decided it, without the kind: a plain training failure
    assert X.status_for(TrainingError("training diverged; replicas out of sync")) == X.TRAINING


@pytest.mark.parametrize("flags, status", [
    (["--fault", "0:3:nan"], X.DIVERGED),
    (["--dataset", "idx"], X.BAD_DATA),                              # no --data-dir: a DataError
    (["--checkpoint-dir", "/nonexistent/ckpt", "--resume"], X.RESUME_REFUSED),
    (["--bogus"], X.USAGE)])
def test_the_trainer_ends_with_the_status_its_failure_means(tmp_path, flags, status):
    base = [f for f in SMALL if f != "--subset"] if "--dataset" in flags else SMALL
    p = launch(0, [*base, *flags], check=False, cwd=tmp_path)
    assert p.returncode == status, p.stderr


def test_under_mpirun_the_status_reaches_the_launcher(tmp_path):
    p = launch(2, [*SMALL, "--fault", "1:3:nan"], check=False, cwd=tmp_path)
    assert p.returncode == X.DIVERGED, p.stderr
    assert p.stderr.count("error:") == 1 and "Abort(" not in p.stderr, p.stderr


def test_a_truncated_label_file_is_bad_data_on_every_rank_said_once(tmp_path):
    d = write_dir(tmp_path / "idx", n_train=60, n_test=20)
    (d / "train-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x01\0\0\0\x05ab")          # a truncated label file
    p = launch(2, ["--dataset", "idx", "--data-dir", d, "--epochs", "1", "--no-progress"], check=False)
    assert p.returncode == X.BAD_DATA, p.stderr
    assert p.stderr.count("error:") == 1, p.stderr


# ------------------------------------------------------------------------------------ the launcher's side

def test_the_wording_of_the_error_line_does_not_change_the_decision():
    reworded = ["lenet-train: rank 0/2: error: TrainingError: the numbers went wild (no usual words here)"]
    assert classify(X.DIVERGED, reworded).kind == "diverged loss"
    assert not classify(X.DIVERGED, reworded).retry and "the numbers went wild" in classify(X.DIVERGED, reworded).why
    assert classify(X.DIVERGED, []).kind == "diverged loss"                     # no line at all: the same
    old_words = ["lenet-train: rank 1/2: error: TrainingError: loss is nan at step 12: training diverged",
                 "lenet-train: rank 0/2: error: ResumeError: other data"]
    f = classify(X.FAILED, old_words)                                          # the status says: may pass
    assert (f.kind, f.retry) == ("rank error", True)
    assert classify(X.CHECKPOINT_FOLDER, []).kind == "checkpoint folder unusable"
    assert not RestartPolicy(max_restarts=5).decide(classify(X.CHECKPOINT_FOLDER, []), now=0)[0]


@pytest.mark.parametrize("code, lines", [
    (9, ["=   BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES", "=   RANK 1 PID 4242 RUNNING AT n2",
         "=   EXIT CODE: 9"]),                                    # MPICH, the rank on another host
    (137, []), (9, [])])
def test_a_remote_sigkill_is_killed_not_exit(code, lines):
    f = classify(code, lines)
    assert (f.kind, f.retry) == ("killed", True) and "SIGKILL" in f.why


def test_a_checkpoint_folder_that_fills_up_mid_run_ends_the_launch_at_once(tmp_path):
    """A full folder, like a read-only one (which cannot be remounted under the writer's open file), refuses
    every restart's writes too: the launch ends at once, saying why, instead of spending its restarts."""
    with tmpfs(tmp_path / "ckpt", "4m"):
        job = Launch(tmp_path, ["-n", 2, "--max-restarts", 5], [*TRAIN, "--epochs", "50"])
        job.wait_for_checkpoint(10)
        with open(job.ckpt / "filler", "wb") as f:                   # take every free byte
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        code = job.finish()
    assert code == 1, job.text
    assert "not restarting: checkpoint folder unusable will recur" in job.text, job.text
    assert job.text.count("lenet-launch INFO starting: ") == 1, job.text
    assert "No space left on device" in job.text


def test_a_read_only_checkpoint_folder_ends_the_launch_at_once(tmp_path):
    with tmpfs(tmp_path / "ckpt", "4m", ro=True):
        job = Launch(tmp_path, ["-n", 2, "--max-restarts", 5], TRAIN)
        code = job.finish()
    assert code == 1 and "not restarting: checkpoint folder unusable will recur" in job.text, job.text
    assert job.text.count("lenet-launch INFO starting: ") == 1 and "Read-only file system" in job.text, job.text
