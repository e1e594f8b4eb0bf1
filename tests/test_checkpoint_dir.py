"""The checkpoint folder under misuse, with real `mpirun` jobs and real files: another run's checkpoints,
resume with other flags, temp files, a full or read-only filesystem, hostile files named like checkpoints."""
import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lenet_dist.checkpoints import folder as ckptdir, format as checkpoint, resume
from lenet_dist.errors import ResumeError

from tests import test_evaluator
from tests.mpiutil import REPO, env, launch

# 600 examples in batches of 100: 6 steps per epoch, a checkpoint every 3 steps
RUN = ["--subset", "--train-subset", "600", "--batch-size", "100", "--checkpoint-every", "3", "--no-progress",
       "--keep", "10", "--stall-timeout", "30"]


def train(n, d, *flags, epochs=1, check=True, timeout=120):
    return launch(n, [*RUN, "--epochs", epochs, "--checkpoint-dir", d, *flags], check=check, timeout=timeout)


def metas(d):
    return {s: checkpoint.load_file(p).meta for s, p in checkpoint.list_checkpoints(d)}


def one_error(p):
    """The one-line error of a failed job (the same line from rank 0 under mpirun)."""
    lines = [line for line in p.stderr.splitlines() if "error:" in line]
    assert lines and "Traceback" not in p.stderr, p.stderr
    return lines[0]


class Evaluator(test_evaluator.Evaluator):
    """lenet-evaluator from this checkout (PYTHONPATH), whatever is installed."""

    def __init__(self, tmp_path, *args):
        test_evaluator.Evaluator.count += 1
        n = test_evaluator.Evaluator.count
        self.report, self.err_path = tmp_path / f"report{n}.jsonl", tmp_path / f"stderr{n}.txt"
        argv = [sys.executable, "-m", "workers.evaluator", "--report", str(self.report), "--subset", "--exit-after-run",
                *map(str, args)]
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(argv, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=err, text=True)


@contextlib.contextmanager
def tmpfs(path, size, ro=False):
    """A small tmpfs at `path` (root only): a filesystem that fills up, or a read-only one."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if ro else ""), "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# ------------------------------------------------------------------------ point 4: whose checkpoints

def test_a_fresh_run_never_takes_over_another_runs_folder(tmp_path):
    d = tmp_path / "ckpt"
    train(2, d, epochs=2)
    before = {p.name: p.read_bytes() for _, p in checkpoint.list_checkpoints(d)}
    first_run = {m["run_id"] for m in metas(d).values()}
    assert sorted(before) == [checkpoint.file_name(s) for s in (3, 6, 9, 12)] and len(first_run) == 1

    p = train(2, d, "--seed", "1", check=False)                     # a new run into the same folder
    line = one_error(p)
    assert p.returncode != 0 and "ResumeError" in line and "another run" in line
    assert "--resume" in line and "--start-over" in line and "another --checkpoint-dir" in line
    assert {p.name: p.read_bytes() for _, p in checkpoint.list_checkpoints(d)} == before   # untouched

    train(2, d, "--seed", "1", "--start-over")                     # on purpose: the old run is moved aside
    [aside] = d.glob("superseded-*")
    assert {p.name: p.read_bytes() for p in aside.iterdir() if p.name.startswith("ckpt")} == before
    assert {p.name for p in aside.iterdir() if not p.name.startswith("ckpt")} == {"last.npz", "last.json"} | (
        {"best.npz", "best.json"} if (aside / "best.json").exists() else set())
    assert json.loads((d / "last.json").read_text())["file"] == checkpoint.file_name(6)   # this run's own
    now = metas(d)
    assert sorted(now) == [3, 6] and {m["run_id"] for m in now.values()}.isdisjoint(first_run)

    # a restart by lenet-launch repeats the flags and adds --resume: it continues the run started over
    p = train(2, d, "--seed", "1", "--start-over", "--resume", "--log-level", "INFO")
    assert "resumed from" in p.stderr and len(list(d.glob("superseded-*"))) == 1


def test_resume_deletes_only_its_own_checkpoints(tmp_path):
    """A later checkpoint of another run, which cannot be resumed from (its position does not fit), stays."""
    d = tmp_path / "ckpt"
    train(2, d, "--keep", "2", epochs=1)
    c = checkpoint.load_file(d / checkpoint.file_name(6))
    foreign = dict(c.meta, step=1300, epoch=0, pos=1300, run_id="someone-else")
    (d / checkpoint.file_name(1300)).write_bytes(checkpoint.to_bytes(c.params, c.velocity, foreign))
    p = train(2, d, "--resume", "--keep", "2", "--override", "epochs", "--log-level", "INFO", epochs=3)
    assert "skipping checkpoint" in p.stderr and "ckpt-000001300.npz" in p.stderr and "does not fit" in p.stderr
    assert "resumed from" in p.stderr and "at step 6" in p.stderr
    assert sorted(metas(d)) == [15, 18, 1300]                      # its own newest two, and the other run's


# --------------------------------------------------------------------- point 5: the saved configuration

def test_resume_continues_the_saved_configuration(tmp_path):
    d = tmp_path / "ckpt"
    train(2, d, "--lr", "0.05", epochs=1)
    run_id = metas(d)[6]["run_id"]

    p = train(2, d, "--resume", "--batch-size", "50", check=False)
    line = one_error(p)
    assert "ResumeError" in line and "--batch-size 50 (saved: 100)" in line and "--override batch-size" in line

    p = train(2, d, "--resume", "--lr", "0.5", "--seed", "7", "--momentum", "0.5", "--schedule", "constant",
              check=False)
    line = one_error(p)
    for diff in ("--lr 0.5 (saved: 0.05)", "--seed 7 (saved: 0)", "--momentum 0.5 (saved: 0.9)",
                 "--schedule 'constant' (saved: 'cosine')"):
        assert diff in line, line
    p = train(2, d, "--resume", "--batch-size", "50", "--override", "batch-size", check=False)
    assert "cannot change on resume: --batch-size" in one_error(p)
    assert sorted(metas(d)) == [3, 6]                              # nothing was written by the refused ones

    p = train(2, d, "--resume", "--lr", "0.02", "--override", "epochs,lr", epochs=2)
    assert "--lr 0.05 -> 0.02" in p.stderr
    last = metas(d)[12]
    assert last["config"]["lr"] == 0.02 and last["config"]["epochs"] == 2 and last["config"]["batch_size"] == 100
    assert last["run_id"] == run_id
    [change] = last["config_changes"]
    assert change["step"] == 6 and change["changes"] == {"epochs": [1, 2], "lr": [0.05, 0.02]}

    p = train(2, d, "--resume", "--log-level", "INFO", epochs=2)   # the same flags as saved: nothing to say
    assert "resumed from" in p.stderr and "error" not in p.stderr


def test_resolve_is_generic():
    saved, asked = {"lr": 0.1, "epochs": 2, "data": "abc"}, {"lr": 0.1, "epochs": 3, "data": "xyz"}
    assert resume.differences(saved, asked, {"lr", "epochs", "data"}) == [("data", "abc", "xyz"), ("epochs", 2, 3)]
    assert resume.resolve(saved, asked, {"lr"}) == (saved, {})                       # not typed: saved wins
    with pytest.raises(ResumeError, match="--data 'xyz' .saved: 'abc'.; --epochs 3 .saved: 2."):
        resume.resolve(saved, asked, {"epochs", "data"})
    assert resume.resolve(saved, asked, {"epochs"}, {"epochs"})[1] == {"epochs": [2, 3]}


# -------------------------------------------------------------------- point 6: full, read-only, temps

def test_temp_files_are_swept_and_a_full_disk_is_one_line_naming_the_path(tmp_path):
    with tmpfs(tmp_path / "small", "600k") as d:
        (d / ".ckpt-000000300.npz.4242.tmp").write_bytes(b"left by a crash")
        p = train(2, d, check=False)                               # ~495 KB each: the second does not fit
        line = one_error(p)
        assert p.returncode != 0 and "No space left on device" in line
        assert f"{d}/ckpt-000000006.npz" in line or f"{d}/ckpt-000000003.npz" in line
        left = [n for n in sorted(os.listdir(d)) if not n.startswith(("last.", "best."))]   # (the pointers)
        assert left in (["ckpt-000000003.npz"], [])                    # no temp file of any kind
        assert "removed 1 temp file" in p.stderr


def test_an_unwritable_checkpoint_folder_is_found_at_start_up(tmp_path):
    with tmpfs(tmp_path / "ro", "1m", ro=True) as d:
        t0 = time.monotonic()
        p = launch(2, [*RUN, "--epochs", "5", "--checkpoint-every", "0", "--checkpoint-dir", d / "ckpt"],
                   check=False, timeout=120)
        line = one_error(p)
        assert p.returncode != 0 and str(d / "ckpt") in line and "Read-only file system" in line
        assert "steps per epoch" not in p.stderr                   # before training began, not after an epoch
        assert time.monotonic() - t0 < 60


def test_evaluator_with_a_full_best_dir_logs_and_goes_on(tmp_path):
    from lenet_dist.transport import TrainerLink

    from lenet_dist.data import load_subset
    from lenet_dist.data.identity import data_record

    from tests.fakes import make_ckpt, make_params
    split = data_record(load_subset().identity(), 2000, 200, seed=0)  # --best-dir chooses on a validation split
    with tmpfs(tmp_path / "best", "600k") as best, TrainerLink("tcp://127.0.0.1:*") as link:
        ev = Evaluator(tmp_path, "--connect", link.endpoint, "--best-dir", best, "--poll-ms", "100")
        try:
            for step, seed in ((1, 0), (2, 1), (3, 2), (4, 3)):    # different weights: a new best is likely
                link.publish(step, 0, make_ckpt(step, params=make_params(seed), final=step == 4, data=split),
                             final=step == 4)
                deadline = time.monotonic() + 30
                while len(ev.lines()) < step:
                    assert ev.proc.poll() is None, ev.stderr
                    assert time.monotonic() < deadline, ev.stderr
                    time.sleep(0.05)
            code, _ = ev.finish()
        finally:
            if ev.proc.poll() is None:
                ev.proc.kill()
        assert code == 0 and [r["step"] for r in ev.lines()] == [1, 2, 3, 4]
        accs = [r["val_accuracy"] for r in ev.lines()]
        if sum(a > max(accs[:i], default=-1) for i, a in enumerate(accs)) > 1:
            assert "could not keep the best checkpoint" in ev.stderr and str(best) in ev.stderr
        assert not [n for n in os.listdir(best) if n.endswith(".tmp")]


# --------------------------------------------------------------------- point 7: hostile files

def test_hostile_files_are_skipped_and_the_newest_usable_wins(tmp_path):
    d = tmp_path / "ckpt"
    train(2, d, epochs=1)
    os.mkfifo(d / checkpoint.file_name(2000))                      # would block whoever opens it
    with open(d / checkpoint.file_name(1000), "wb") as f:          # 3 GB, sparse: costs no disk
        f.truncate(3 << 30)
    c = checkpoint.load_file(d / checkpoint.file_name(6))          # verifies, but step 999 is not batch 0
    (d / checkpoint.file_name(999)).write_bytes(checkpoint.to_bytes(c.params, c.velocity, dict(c.meta, step=999)))
    (d / checkpoint.file_name(998)).write_bytes(checkpoint.to_bytes(c.params, c.velocity, dict(c.meta)))  # step 6
    p = train(2, d, "--resume", "--override", "epochs", "--log-level", "INFO", epochs=2, timeout=120)
    for name, why in ((2000, "not a regular file"), (1000, "3221225472 bytes, more than"), (999, "its position"),
                      (998, "named for step 998")):
        assert re.search(rf"skipping checkpoint: \S*{checkpoint.file_name(name)}: {why}", p.stderr), p.stderr
    assert "at step 6" in p.stderr and 12 in metas_safe(d)


def metas_safe(d):
    return {s for s, p in checkpoint.list_checkpoints(d) if p.is_file() and p.stat().st_size < 1 << 20}


def test_a_big_file_is_never_read_whole_under_a_memory_limit(tmp_path):
    d = tmp_path / "ckpt"
    train(0, d, epochs=1)
    with open(d / checkpoint.file_name(1000), "wb") as f:
        f.truncate(3 << 30)

    def limit():                                                   # 3 GB could not even be allocated
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    cmd = [sys.executable, "-m", "workers.trainer", *RUN, "--epochs", "2", "--override", "epochs",
           "--checkpoint-dir", str(d), "--resume"]
    p = subprocess.run(cmd, cwd=REPO, env=env(OPENBLAS_NUM_THREADS=1), capture_output=True, text=True,
                       timeout=120, preexec_fn=limit)
    assert p.returncode == 0, p.stderr
    assert "ckpt-000001000.npz: 3221225472 bytes, more than the" in p.stderr and "MemoryError" not in p.stderr


def test_watching_evaluator_skips_a_fifo_and_still_obeys_sigterm(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    os.mkfifo(d / checkpoint.file_name(5))
    ev = Evaluator(tmp_path, "--watch", d)
    try:
        ev.wait_for("not a regular file", timeout=30)
        ev.proc.send_signal(signal.SIGTERM)
        code, _ = ev.finish(timeout=10)
    finally:
        if ev.proc.poll() is None:
            ev.proc.kill()
    assert code == 0


def test_read_bounded(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x" * 100)
    assert checkpoint.read_bounded(p, 100) == b"x" * 100
    with pytest.raises(checkpoint.CheckpointError, match="101 bytes, more than the 100"):
        p.write_bytes(b"x" * 101)
        checkpoint.read_bounded(p, 100)
    with pytest.raises(checkpoint.CheckpointError, match="not a regular file"):
        checkpoint.read_bounded(tmp_path, 100)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(checkpoint.CheckpointError, match="not a regular file"):
        checkpoint.read_bounded(tmp_path / "fifo", 100)


def test_writer_leaves_nothing_behind_and_keeps_only_its_own(tmp_path):
    d = tmp_path / "w"
    d.mkdir()
    (d / checkpoint.file_name(1)).write_bytes(b"not ours")
    w = ckptdir.CheckpointWriter(d, keep=2, warn=lambda m: None)
    for step in (10, 20, 30):
        w.write(step, b"data %d" % step)
    assert sorted(os.listdir(d)) == sorted([checkpoint.file_name(s) for s in (1, 20, 30)] +
                                           [f".ckpt-next.{os.getpid()}.tmp"])
    w.close()
    assert sorted(os.listdir(d)) == [checkpoint.file_name(s) for s in (1, 20, 30)]
    assert json is not None and np is not None


def test_a_pointer_that_cannot_be_written_is_a_warning_not_the_end_of_the_run(tmp_path, monkeypatch):
    """Out of descriptors (an idle-connection flood) the last/best pointer waits for one; anything else, or
    descriptors that never come free, is one warning: the checkpoint is already on disk."""
    import errno

    from lenet_dist.checkpoints import folder as ckptdir
    target = tmp_path / checkpoint.file_name(5)
    target.write_bytes(b"a checkpoint")
    calls, real, warnings = [], checkpoint.set_pointer, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) < 3:
            raise OSError(errno.EMFILE, "Too many open files")
        return real(*a, **k)
    monkeypatch.setattr(ckptdir, "set_pointer", flaky)
    assert ckptdir.point(tmp_path, "last", target, {"step": 5}, warn=warnings.append) and len(calls) == 3
    assert json.loads((tmp_path / "last.json").read_text()) == {"file": target.name, "step": 5}

    def broken(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ckptdir, "set_pointer", broken)
    monkeypatch.setattr(ckptdir, "POINTER_WAIT_S", 0.2)
    assert not ckptdir.point(tmp_path, "best", target, {}, warn=warnings.append)
    assert warnings == [
        f"could not point {tmp_path / 'best.npz'} at {target.name} (No space left on device); the checkpoint "
        f"itself is written"]
