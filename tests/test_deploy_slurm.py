"""deploy/slurm/train.sbatch on a real Slurm cluster: slurmctld and three slurmd, each node a network
namespace with its own hostname and address (tests/slurm_cluster.py), Debian's slurm-wlm 22.05 and munge.
The recipe is submitted unmodified but for --nodes and --export, as a user submits it:

    node  address      runs
    n1    10.78.0.1    the batch script, rank 0 (srun --mpi=pmi2; binds the publish port)
    n2    10.78.0.2    rank 1
    n3    10.78.0.3    lenet-evaluator, its own job step
    ctl   10.78.0.100  slurmctld; sbatch, scancel and scontrol are run here

A first job is cancelled with scancel once it has written a checkpoint: it must stop with one; the same job
submitted again must resume from it and finish, with the evaluator's report where the recipe says. Needs
root, iproute2 and the Debian packages (scripts/setup-tests.sh); skips, saying which is missing, otherwise.
The cluster's daemons and namespaces are removed even when the test fails.
"""
import json
import os
import re
import shlex
import shutil
import sys

import numpy as np
import pytest

from lenet_dist.checkpoints import resume
from lenet_dist.transport import generate_keys

from tests.mpiutil import REPO, final_params, launch
from tests.netns import made_or_skip
from tests.slurm_cluster import SlurmCluster, unavailable

SBATCH = REPO / "deploy" / "slurm" / "train.sbatch"
STEPS_PER_EPOCH = 37                    # 1,834 subset images (166 held out for validation) / batch 50
EPOCHS = 5
JOB_NAME = "lenet-dist"                 # the script's own #SBATCH --job-name


@pytest.fixture
def cluster(tmp_path):
    why = unavailable()
    c = None if why else SlurmCluster(tmp_path / "slurm", f"lslurm{os.getpid()}", ["n1", "n2", "n3"])
    with made_or_skip(lambda: c.start(), lambda: c and c.close(), why):
        yield c


def submit_dir(tmp_path):
    """The submit directory (every node sees it: one filesystem), with this checkout's commands on PATH and
    the CurveZMQ keys in deploy/README.md's layout for KEYS_DIR."""
    d = tmp_path / "submit"
    bindir = d / "bin"
    bindir.mkdir(parents=True)
    for name, module in (("lenet-train", "workers.trainer"), ("lenet-evaluator", "workers.evaluator")):
        (bindir / name).write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m {module} \"$@\"\n")
        (bindir / name).chmod(0o755)
    keys = d / "keys"
    generate_keys(keys, "trainer")
    evaluator_public, _ = generate_keys(keys, "evaluator")
    (keys / "authorized").mkdir()
    shutil.copy(evaluator_public, keys / "authorized")
    return d, bindir, keys


def job_env(bindir):
    e = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", PYTHONUNBUFFERED="1",
             PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
             # MPI data over TCP on the nodes' links: left alone, MPICH's UCX sees one machine and uses shared
             # memory. Its OFI netmod, not UCX: UCX's long addresses reach Slurm's PMI in segments, which
             # slurmstepd's pmi2 plugin sometimes reads split ("value not properly terminated").
             MPIR_CVAR_CH4_NETMOD="ofi", FI_PROVIDER="tcp", FI_TCP_IFACE="eth0")
    for var in ("LENET_DATA_DIR", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "LENET_FAULT"):
        e.pop(var, None)
    return e


def newest_step(ckpt_dir):
    found = resume.newest_usable(ckpt_dir, warn=lambda m: None) if ckpt_dir.exists() else None
    return found[1].step if found else None


def stop_step(log):
    """The step at which the ranks stopped on a signal, each with its checkpoint written (both ranks agree)."""
    steps = {int(s) for s in re.findall(r"stopped by signal \d+ at step (\d+) \(SIG\w+\); "
                                        r"(?:checkpoint \S+ written|rank 0 writes the checkpoint)", log)}
    assert len(steps) == 1, log
    return steps.pop()


def test_sbatch_recipe_on_a_real_cluster_cancels_with_a_checkpoint_and_resumes(cluster, tmp_path):
    d, bindir, keys = submit_dir(tmp_path)
    env = job_env(bindir)
    run_dir = d / "runs" / JOB_NAME                       # the recipe's run folder: by job name
    args = ["--nodes=3", f"--export=ALL,RANKS_PER_NODE=1,KEYS_DIR={keys},EVAL_ARGS=--subset,EVAL_GRACE=60",
            str(SBATCH), "--subset", "--epochs", str(EPOCHS), "--batch-size", "50", "--checkpoint-every", "10",
            "--no-progress"]

    # First job: requeued by Slurm (as after a node failure) once it has written a checkpoint; it stops
    # with a checkpoint, starts again under the same job id and resumes there.
    first = cluster.sbatch(args, cwd=d, env=env)
    out = d / f"{JOB_NAME}-{first}.out"                   # %x-%j.out, appended to by each start
    cluster.wait_for(lambda: newest_step(run_dir / "checkpoints") is not None, f"a checkpoint in {run_dir}",
                     job_id=first, timeout=120)
    cluster.run(["scontrol", "requeue", first])
    cluster.wait_for(lambda: "requeued job, start number 2" in out.read_text(), "the requeued start",
                     job_id=first, timeout=120)
    requeue_step = stop_step(out.read_text())
    cluster.wait_for(lambda: re.search(rf"resumed from .* at step {requeue_step}/", out.read_text()),
                     f"a resume from step {requeue_step}", job_id=first, timeout=60)

    # Then cancelled once it has written another checkpoint: it stops with one.
    cluster.wait_for(lambda: newest_step(run_dir / "checkpoints") > requeue_step, "a newer checkpoint",
                     job_id=first, timeout=60)
    cluster.run(["scancel", first])
    cluster.wait_state(first, {"CANCELLED"}, timeout=90)
    text = out.read_text()
    cancel_step = stop_step(text[text.index("requeued job, start number 2"):])
    assert requeue_step < cancel_step < EPOCHS * STEPS_PER_EPOCH, text
    assert newest_step(run_dir / "checkpoints") == cancel_step, text
    # Every rank says which signal the job received (scancel sends SIGTERM), not "signal 0" for a rank that
    # stopped because its peer voted to, and every rank exits alike: 128 + 15.
    cancelled = text[text.index("requeued job, start number 2"):]
    stops = re.findall(r"rank (\d)/2 WARNING stopped by signal (\d+) at step \d+ \((SIG\w+)\);.*exit status (\d+)",
                       cancelled)
    assert sorted(stops) == [("0", "15", "SIGTERM", "143"), ("1", "15", "SIGTERM", "143")], cancelled

    # Submitted again under the same name: it resumes there and finishes.
    second = cluster.sbatch(args, cwd=d, env=env)
    fields = cluster.wait_state(second, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=240)
    out2 = (d / f"{JOB_NAME}-{second}.out").read_text()
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", (fields, out2)
    assert re.search(rf"resumed from .* at step {cancel_step}/", out2), out2

    # Ranks on n1 and n2 (the pre-flight names each rank's host), the evaluator on n3.
    assert "2 rank(s) on 2 host(s): n1 (rank 0), n2 (rank 1)" in out2, out2
    # One rank on each 2-CPU node: Slurm's own variables say so, and nothing is taken for oversubscribed.
    assert "more ranks than cores" not in text + out2, text + out2
    assert "ok    rank 0 on n1  results: tcp://n3:5556 accepts connections" in out2, out2
    # Checkpoints, metrics and the evaluator's report where the recipe says (deploy/README.md).
    total = EPOCHS * STEPS_PER_EPOCH
    assert newest_step(run_dir / "checkpoints") == total
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r.get("event") == "epoch"]
    assert epochs[-1]["step"] == total and epochs[-1]["ranks"] == 2, epochs[-1]
    report = [json.loads(line) for line in (run_dir / "evaluator.jsonl").read_text().splitlines()]
    last = report[-1]
    assert last["final"] and last["step"] == total, report[-3:]
    assert last["evaluator"].startswith("n3:"), last
    assert last["accuracy"] == pytest.approx(epochs[-1]["test_acc"], abs=1e-9)
    assert (run_dir / "best" / "best.json").exists()


def starts(log):
    """The log of each start of a job (a requeued job appends to the same file)."""
    return re.split(r"(?=\[train\.sbatch [\d:]+\] ranks: )", log)[1:]


# A minute is Slurm's shortest limit; the warning comes 10 s before it (and up to one of slurmctld's 30 s
# checks earlier), so each start trains for 20-50 s of it. The run must outlast a first start on an idle
# machine (~0.5 s an epoch here: 40 epochs ended within one start), and finish in a few on a busy one.
LIMIT_ARGS = ["--time=1", "--signal=B:USR1@10"]
LIMIT_EPOCHS = 150


def test_a_job_at_its_time_limit_checkpoints_requeues_itself_and_ends_as_if_uninterrupted(cluster, tmp_path):
    d, bindir, keys = submit_dir(tmp_path)
    run_dir = d / "runs" / JOB_NAME
    train = ["--subset", "--epochs", str(LIMIT_EPOCHS), "--batch-size", "50", "--deterministic", "--no-progress"]
    args = ["--nodes=3", *LIMIT_ARGS, f"--export=ALL,RANKS_PER_NODE=1,KEYS_DIR={keys},EVAL_ARGS=--subset,EVAL_GRACE=30",
            str(SBATCH), *train, "--checkpoint-every", "50"]
    job = cluster.sbatch(args, cwd=d, env=job_env(bindir))
    fields = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=1200)
    log = (d / f"{JOB_NAME}-{job}.out").read_text()
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", (fields, log)

    # Every start but the last was warned, stopped with a checkpoint on SIGUSR1 and requeued the job; the
    # next start resumed exactly there.
    runs = starts(log)
    assert len(runs) >= 2, log
    for n, (this, following) in enumerate(zip(runs, runs[1:]), 1):
        stops = re.findall(r"rank (\d)/2 WARNING stopped by signal 10 at step (\d+) \(SIGUSR1\);.*exit status (\d+)",
                           this)
        assert sorted(stops) == [("0", stops[0][1], "138"), ("1", stops[0][1], "138")], this
        assert f"requeueing job {job}" in this, this
        # The evaluator's step is stopped gently (srun passes SIGUSR1 on), not killed.
        assert "evaluator INFO stopped by signal 10" in this and "n3: task 0: Killed" not in this, this
        assert f"requeued job, start number {n + 1}" in following, following
        assert re.search(rf"resumed from .* at step {stops[0][1]}/", following), following
    assert "SIGUSR1" not in runs[-1] and "training finished with status 0" in runs[-1], runs[-1]

    # The same parameters, bit for bit, as one run of the same flags never interrupted (2 ranks here).
    healed, meta = final_params(run_dir / "checkpoints")
    launch(2, [*train, "--checkpoint-dir", tmp_path / "reference"], timeout=600)
    expected, ref_meta = final_params(tmp_path / "reference")
    assert meta["step"] == ref_meta["step"] == LIMIT_EPOCHS * STEPS_PER_EPOCH
    assert np.array_equal(healed, expected), "the requeued run's parameters differ from the uninterrupted run's"


def test_the_time_limit_itself_still_yields_the_stop_checkpoint(cluster, tmp_path):
    """Without the warning (the header's --signal replaced by a signal the job ignores), Slurm's own time-limit
    sequence, SIGTERM, SIGCONT, SIGTERM, reaches the ranks: they stop with a checkpoint, every rank alike."""
    d, bindir, keys = submit_dir(tmp_path)
    run_dir = d / "runs" / JOB_NAME
    args = ["--nodes=3", "--time=1", "--signal=B:URG@10",
            f"--export=ALL,RANKS_PER_NODE=1,KEYS_DIR={keys},EVAL_ARGS=--subset,EVAL_GRACE=30",
            str(SBATCH), "--subset", "--epochs", "1000", "--batch-size", "50", "--checkpoint-every", "1000",
            "--no-progress"]
    job = cluster.sbatch(args, cwd=d, env=job_env(bindir))
    fields = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout=240)
    log = (d / f"{JOB_NAME}-{job}.out").read_text()
    assert fields["JobState"] == "TIMEOUT", (fields, log)
    stops = re.findall(r"rank (\d)/2 WARNING stopped by signal 15 at step (\d+) \(SIGTERM\);.*exit status (\d+)", log)
    assert len(stops) == 2 and {r for r, _, _ in stops} == {"0", "1"}, log
    assert {(s, code) for _, s, code in stops} == {(stops[0][1], "143")}, log
    assert newest_step(run_dir / "checkpoints") == int(stops[0][1]), log
