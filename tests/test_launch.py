"""lenet-launch for real: mpirun, real ranks, real signals. A rank killed twice heals into the same
parameters as a run never interrupted; failures that recur are not retried; the limit holds; a host the
launcher cannot start is left out; SIGTERM to the launcher is a clean stop, not a failure."""
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from lenet_dist.checkpoints import format as checkpoint
from workers.launch import parse_args

from tests.mpiutil import REPO, env, final_params, launch, need_mpirun, rank_pid

TRAIN = ["--subset", "--val-size", "0",  # no held-out split: 40 steps an epoch
         "--epochs", "3", "--batch-size", "50", "--checkpoint-every", "5", "--no-progress"]
STEPS = 120                                         # 3 epochs of 2,000 subset images in batches of 50


class Launch:
    """`python -m workers.launch ...` with its output collected line by line, so a test can wait for one."""

    def __init__(self, tmp_path, launch_args, train_args, extra_env=None):
        need_mpirun()
        self.ckpt, self.metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
        argv = [sys.executable, "-m", "workers.launch", "--backoff", "0.2", *map(str, launch_args), "--",
                *map(str, train_args), "--checkpoint-dir", self.ckpt, "--metrics", self.metrics]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                     env=env(**(extra_env or {})))
        self.lines, self.changed = [], threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()

    @property
    def text(self):
        return "".join(self.lines)

    def wait_for(self, text, count=1, timeout=60):
        with self.changed:
            ok = self.changed.wait_for(lambda: self.text.count(text) >= count or self.proc.poll() is not None,
                                       timeout)
        assert ok and self.text.count(text) >= count, f"no {count}x '{text}':\n{self.text}"

    def wait_for_checkpoint(self, step, timeout=60):
        deadline = time.monotonic() + timeout
        while not (found := checkpoint.list_checkpoints(self.ckpt)) or found[0][0] < step:
            assert self.proc.poll() is None and time.monotonic() < deadline, self.text
            time.sleep(0.02)

    def rank_pid(self, rank):
        """The pid of trainer rank `rank`, from the MPI rank in its environment."""
        pid = rank_pid(self.proc.pid, rank)
        assert pid is not None, f"no rank {rank} below pid {self.proc.pid}:\n{self.text}"
        return pid

    def finish(self, timeout=120):
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"lenet-launch did not finish in {timeout} s:\n{self.text}")
        self.reader.join(10)                        # it ends at EOF
        return self.proc.returncode

    def rows(self, event=None):
        rows = [json.loads(line) for line in self.metrics.read_text().splitlines()]
        return [r for r in rows if event is None or r["event"] == event]


def test_a_rank_killed_twice_heals_into_the_uninterrupted_parameters(tmp_path):
    reference = tmp_path / "reference"
    launch(2, [*TRAIN, "--checkpoint-dir", reference])
    rng = random.Random()
    first = rng.randrange(10, 50)
    second = rng.randrange(first + 15, 100)
    job = Launch(tmp_path, ["-n", 2], TRAIN)
    for n, step in enumerate((first, second), 1):
        job.wait_for("the first of this start", count=n)
        job.wait_for_checkpoint(step)               # a random step, reached: kill rank 1 there
        os.kill(job.rank_pid(1), signal.SIGKILL)
    assert job.finish() == 0, job.text
    restarts = job.rows("restart")
    assert [r["attempt"] for r in restarts] == [1, 2], job.text
    assert all(r["failure"] == "killed" and "SIGKILL" in r["reason"] for r in restarts), restarts
    end = job.rows()[-1]
    assert (end["event"], end["outcome"], end["restarts"]) == ("end", "finished", 2)
    healed, meta = final_params(job.ckpt)
    expected, ref_meta = final_params(reference)
    assert meta["step"] == ref_meta["step"] == STEPS
    assert np.array_equal(healed, expected), "parameters differ from the uninterrupted run"


def test_without_a_checkpoint_dir_a_killed_rank_resumes_from_the_launchers_run_folder(tmp_path):
    """No --checkpoint-dir, no --metrics: the launcher names the run folder (runs/<time>-<id>/), every start
    of the job trains in it, and the healed run ends in the parameters of an uninterrupted one."""
    reference = tmp_path / "reference"
    launch(2, [*TRAIN, "--checkpoint-dir", reference])
    work = tmp_path / "work"
    work.mkdir()
    argv = [sys.executable, "-m", "workers.launch", "--backoff", "0.2", "-n", "2", "--", *TRAIN]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=work, env=env())
    deadline = time.monotonic() + 60
    while not (folders := list((work / "runs").glob("*"))) or not checkpoint.list_checkpoints(folders[0]):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.05)
    os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    folder, = (work / "runs").iterdir()                             # one folder, every start's
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["attempt"] for r in rows if r["event"] == "restart"] == [1], out
    assert f"--run-name {folder.name}" in out
    healed, meta = final_params(folder)
    expected, _ = final_params(reference)
    assert meta["step"] == STEPS and np.array_equal(healed, expected)


@pytest.mark.parametrize("flags, kind", [(["--bogus"], "usage error"), (["--fault", "1:12:nan"], "diverged loss")])
def test_a_failure_that_would_recur_is_not_retried(tmp_path, flags, kind):
    job = Launch(tmp_path, ["-n", 2, "--max-restarts", 5], [*TRAIN, *flags])
    code = job.finish()
    assert code in (1, 2) and f"not restarting: {kind} will recur" in job.text, job.text
    assert job.text.count("lenet-launch INFO starting: ") == 1
    assert [r["event"] for r in job.rows() if r["event"] not in ("epoch", "step")] == ["start", "end"]
    assert job.rows()[-1]["outcome"] == "gave up" and job.rows()[-1]["failure"] == kind


def test_the_restart_limit_holds(tmp_path):
    """A rank that exits at step 12 every time (resumed from step 10, it gets there again)."""
    job = Launch(tmp_path, ["-n", 2, "--max-restarts", 2], [*TRAIN, "--fault", "1:12:exit"])
    assert job.finish() == 17, job.text
    assert [r["attempt"] for r in job.rows("restart")] == [1, 2]
    assert "already 2 restart(s) within 3600 s (--max-restarts 2)" in job.text, job.text
    assert job.rows()[-1]["outcome"] == "gave up"


def test_a_host_that_cannot_be_started_is_left_out_down_to_min_ranks(tmp_path):
    """The hostfile's second host cannot be reached (its agent fails as ssh does): the first start fails,
    the probe finds the host lost, and the job runs on the one rank left, with the same global batch."""
    agent = tmp_path / "agent"
    agent.write_text("#!/bin/sh\necho \"ssh: connect to host $2: No route to host\" >&2\nexit 255\n")
    agent.chmod(0o755)
    (tmp_path / "hosts").write_text("localhost:1\nlost.invalid:1\n")
    job = Launch(tmp_path, ["-n", 2, "--min-ranks", 1, "--hostfile", tmp_path / "hosts", "--probe-timeout", 10,
                            "--mpirun-args", f"-launcher ssh -launcher-exec {agent}"], TRAIN)
    assert job.finish() == 0, job.text
    assert "hosts not answering: lost.invalid: continuing on 1 rank(s) (asked 2, --min-ranks 1)" in job.text
    restart = job.rows("restart")[-1]
    assert restart["ranks"] == 1 and restart["asked_ranks"] == 2
    epochs = job.rows("epoch")
    assert epochs[-1]["step"] == STEPS and {r["ranks"] for r in epochs} == {1}
    assert "global batch 50 (~50 per rank)" in job.text


def test_below_min_ranks_it_gives_up(tmp_path):
    agent = tmp_path / "agent"
    agent.write_text("#!/bin/sh\nexit 255\n")
    agent.chmod(0o755)
    (tmp_path / "hosts").write_text("localhost:1\nlost.invalid:1\n")
    job = Launch(tmp_path, ["-n", 2, "--hostfile", tmp_path / "hosts", "--probe-timeout", 10,
                            "--mpirun-args", f"-launcher ssh -launcher-exec {agent}"], TRAIN)
    assert job.finish() != 0
    assert "not restarting: only 1 rank(s) can be started (hosts not answering: lost.invalid); --min-ranks " \
           "is 2" in job.text, job.text


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_launcher_stops_the_job_cleanly(tmp_path, signum):
    job = Launch(tmp_path, ["-n", 2], [*TRAIN, "--epochs", "50"])
    job.wait_for("the first of this start")
    job.wait_for_checkpoint(10)
    job.proc.send_signal(signum)
    assert job.finish() == 128 + signum, job.text
    assert job.text.count(f"stopped by signal {signum} at step") == 2, job.text   # both ranks agreed
    assert "restart" not in [r["event"] for r in job.rows()]
    end = job.rows()[-1]
    assert end["outcome"] == "stopped" and end["signal"] == signum
    assert checkpoint.list_checkpoints(job.ckpt)[0][0] == end["step"] > 10     # the stop's own checkpoint


def test_restarts_need_checkpoints_and_min_ranks_at_most_ranks(capsys):
    with pytest.raises(SystemExit):
        parse_args(["-n", "2", "--", "--subset", "--no-save"])
    assert "restarts resume from checkpoints, and --no-save keeps none" in capsys.readouterr().err
    own = parse_args(["-n", "2", "--", "--subset"])                 # a run folder of the launcher's naming
    name = own.train_args[own.train_args.index("--run-name") + 1]
    assert own.checkpoint_dir == f"runs/{name}" and own.metrics == f"runs/{name}/metrics.jsonl"
    named = parse_args(["-n", "2", "--", "--subset", "--run-name", "mine", "--metrics", "m.jsonl"])
    assert named.train_args.count("--run-name") == 1 and named.checkpoint_dir == "runs/mine"
    assert named.metrics == "m.jsonl"
    with pytest.raises(SystemExit):
        parse_args(["-n", "2", "--min-ranks", "3", "--", "--checkpoint-dir", "c"])
    assert "--min-ranks 3" in capsys.readouterr().err
    assert parse_args(["-n", "2", "--max-restarts", "0", "--", "--subset"]).train_args == ["--subset"]


@pytest.mark.parametrize("version, flavor, hostfile_flag, line", [
    ("HYDRA build details:\n    Version: 5.0.2", "mpich", "-f", "n1:2\n"),
    ("mpirun (Open MPI) 4.1.5\n\nReport bugs to http://www.open-mpi.org/community/help/", "openmpi", "--hostfile",
     "n1 slots=2\n")])
def test_each_mpi_gets_its_own_spelling(tmp_path, version, flavor, hostfile_flag, line):
    """What lenet-launch passes to MPICH's and to Open MPI's mpirun (the flavour is read from --version)."""
    from workers.launch import Launcher
    mpirun = tmp_path / "mpirun"
    mpirun.write_text(f"#!/bin/sh\ncat <<'EOF'\n{version}\nEOF\n")
    mpirun.chmod(0o755)
    (tmp_path / "hosts").write_text("n1 slots=2\nn2:2\n")
    args = parse_args(["-n", "4", "--min-ranks", "2", "--hostfile", str(tmp_path / "hosts"), "--mpirun", str(mpirun),
                       "--mpirun-args", "-x PATH", "--trainer", "lenet-train", "--", "--checkpoint-dir", "c"])
    launcher = Launcher(args)
    try:
        assert launcher.flavor == flavor
        launcher.hosts, launcher.ranks = [("n1", 2)], 2          # as after n2 stopped answering
        argv = launcher.command(resume=True)
        i = argv.index(hostfile_flag)
        assert argv[:i] == [str(mpirun), "-x", "PATH", "-n", "2"]
        assert argv[i + 2:] == ["lenet-train", "--checkpoint-dir", "c", "--resume"]
        with open(argv[i + 1]) as f:
            assert f.read() == line
    finally:
        launcher.tmp.cleanup()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
