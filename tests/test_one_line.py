"""An honest mistake gets one line: a bad flag (not the usage block), --threads beyond the CPUs, --val-size
beyond the data, each said once under mpirun; the straggler hint once; the hints printed at the end of a run
(resume:, evaluate:) work when pasted, --dataset included, and follow Slurm's srun under a job step."""
import shlex
import subprocess
import sys

import pytest

from lenet_dist.run.outcome import train_command

from tests import idxdata
from tests.mpiutil import REPO, env, launch


def error_lines(p):
    return [line for line in p.stderr.splitlines() if "error" in line.lower()]


@pytest.mark.parametrize("flags, says", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--threads", "100000"], "--threads 100000: more than the"),
    (["--val-size", "5000"], "--val-size 5000: must be less than the 2000 training examples")])
@pytest.mark.parametrize("n", [0, 2])
def test_a_usage_error_is_one_line_said_once(flags, says, n):
    p = launch(n, ["--subset", "--epochs", "1", "--no-progress", *flags], check=False)
    assert p.returncode == 2, p.stderr
    lines = error_lines(p)
    assert len(lines) == 1 and says in lines[0], p.stderr
    assert "usage:" not in p.stderr and "Abort(" not in p.stderr and "Traceback" not in p.stderr
    if flags[0] != "--val-size":
        assert lines[0].endswith("(see lenet-train --help)")


def test_the_straggler_hint_is_said_once(tmp_path):
    p = launch(2, ["--subset", "--epochs", "2", "--no-progress", "--train-subset", "400", "--val-size", "0",
                   "--fault", "1:0:slow"], cwd=tmp_path)
    assert p.stderr.count("computed") == 2 and all("rank 0/2" in line for line in p.stderr.splitlines()
                                                   if "--balance would" in line), p.stderr


def test_the_printed_resume_and_evaluate_commands_work_with_their_dataset(tmp_path):
    data = idxdata.write_dir(tmp_path / "idx", n_train=300, n_test=100)
    ck = tmp_path / "ck"
    p = launch(0, ["--dataset", "idx", "--data-dir", data, "--epochs", "2", "--batch-size", "50",
                   "--checkpoint-dir", ck, "--no-progress", "--fault", "0:4:term"], check=False)
    assert p.returncode == 143, p.stderr
    resume = next(x for x in p.stdout.splitlines() if x.strip().startswith("resume: ")).split("resume: ", 1)[1]
    argv = shlex.split(resume)
    assert argv[0] == "lenet-train" and argv.count("--resume") == 1 and "--fault" in argv
    argv = [a for a in argv[1:] if a not in ("--fault", "0:4:term")]
    q = launch(0, argv)
    evaluate = next(x for x in q.stdout.splitlines() if x.strip().startswith("evaluate: ")).split(": ", 1)[1]
    assert "--dataset=idx" in evaluate
    r = subprocess.run([sys.executable, "-m", "workers.evaluator", *shlex.split(evaluate)[1:]],  # lenet-evaluator
                       capture_output=True, text=True, cwd=REPO, env=env(), timeout=120)
    assert r.returncode == 0, r.stderr


def test_under_a_slurm_job_step_the_command_is_srun_and_resume_is_not_doubled():
    argv = ["--checkpoint-dir", "runs/ck", "--resume", "auto", "--dataset", "idx"]
    slurm = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_MPI_TYPE": "pmi2"}
    assert shlex.split(train_command(argv, 8, ["--resume"], slurm)) == [
        "srun", "--mpi=pmi2", "-n", "8", "lenet-train", "--checkpoint-dir", "runs/ck", "--dataset", "idx", "--resume"]
    assert shlex.split(train_command(argv, 2, ["--resume"], {})) == [
        "mpirun", "-n", "2", "lenet-train", "--checkpoint-dir", "runs/ck", "--dataset", "idx", "--resume"]
    assert train_command(["--resume=auto", "--start-over"], 1, ["--resume"], {}) == "lenet-train --resume"


def test_test_mode_names_no_file_it_then_deletes():
    p = launch(0, ["--test-mode"], timeout=300)
    text = p.stdout + p.stderr
    assert "evaluator.jsonl" not in text and "metrics.jsonl" not in text, text
    assert "(removed when the test passes)" in p.stdout


def test_checkpoint_every_without_a_folder_is_not_silently_ignored():
    p = launch(2, ["--subset", "--epochs", "1", "--no-progress", "--train-subset", "200", "--checkpoint-every", "2",
                   "--no-save"])
    lines = [x for x in p.stderr.splitlines() if "--checkpoint-every 2 keeps nothing without --checkpoint-dir" in x]
    assert len(lines) == 1 and "rank 0/2" in lines[0], p.stderr


def test_an_error_every_rank_has_is_said_once_by_rank_0():
    """A failure of no known kind that every rank meets at the same point is said by rank 0 alone, on a line
    of its own; one that only one rank meets, by that rank."""
    p = launch(2, ["--subset", "--epochs", "1", "--no-progress", "--no-save", "--fault", "0:2:raise,1:2:raise"],
               check=False)
    lines = [x for x in p.stderr.splitlines() if ": error: " in x]
    assert p.returncode == 1 and lines == ["lenet-train: rank 0/2: error: RuntimeError: injected fault at step 2"], \
        p.stderr
    p = launch(2, ["--subset", "--epochs", "1", "--no-progress", "--no-save", "--fault", "1:2:raise"], check=False)
    lines = [x for x in p.stderr.splitlines() if ": error: " in x]
    assert p.returncode == 1 and lines == ["lenet-train: rank 1/2: error: RuntimeError: injected fault at step 2"], \
        p.stderr
