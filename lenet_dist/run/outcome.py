"""How a training run ends: the signal every rank stops for, the tally of what the run reached, the end
row of --metrics and the commands that go on from there (resume, evaluate, export)."""
from __future__ import annotations

import json
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lenet_dist import selection
from lenet_dist.files import read_regular
from lenet_dist.stopsignal import signal_name


@dataclass(frozen=True)
class RunFacts:
    """What the end row says about a run's files and how to go on (filled by the process from its flags)."""
    checkpoint_dir: Path | None = None  # --checkpoint-dir
    metrics: Path | None = None         # --metrics
    argv: tuple = ()                    # lenet-train's flags as typed: the resume command repeats them
    data_flags: tuple = ()              # the flags naming its data: the evaluate command repeats them
    test_mode: bool = False             # a rehearsal: nothing to go on with
    run_id: str | None = None           # rank 0's run id: only this run's last/best pointers are named
    restarts: int | None = None         # under lenet-launch: the restarts before this start (its end row's)


def agreed_signal(comm, mine):
    """The signal the job stops for, the same on every rank: the one the lowest-numbered rank received.
    A rank that stops because a peer asked has received none (0) itself. One allgather; every rank calls
    it once, right after the step in which they agreed to stop."""
    got = comm.allgather(np.array([mine], np.int64))[:, 0]                 # [dist]
    received = got[got > 0]
    return int(received[0]) if len(received) else int(mine)


class Tally:
    """What the run reached, kept by rank 0: images and seconds trained, the test accuracy of the last and
    of the best epoch (and the best's checkpoint), the evaluator's latest and best verdicts. "Best" is the
    one rule of lenet_dist/selection.py (validation accuracy, then lower validation loss, then the later
    step), the evaluator's too, so both name the same step."""

    def __init__(self, best_json=None, run_id=None):
        self.images, self.seconds = 0, 0.0
        self.test_acc = self.last_epoch = None
        self.best = None                            # the best epoch row so far (selection's fields)
        self.evaluator = None
        self.ev_best = None
        if best_json is not None:                  # --resume: the best so far stays the best to beat
            try:
                b = json.loads(read_regular(best_json, 1 << 20))
                if b.get("run_id") != run_id:
                    raise ValueError("another run's best")
                self.best = {"step": int(b["step"]), "epoch": int(b["epoch"]), "test_acc": float(b["test_acc"]),
                             "val_acc": b.get("val_acc"), "val_loss": b.get("val_loss")}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass

    @property
    def best_epoch(self):
        return self.best and self.best["epoch"]

    @property
    def best_step(self):
        return self.best and self.best["step"]

    @property
    def best_test_acc(self):
        return self.best and self.best["test_acc"]

    def add_training(self, images, seconds):
        self.images += images
        self.seconds += seconds

    def add_epoch(self, record):
        """Returns True when this epoch is the best so far."""
        self.test_acc, self.last_epoch = record["test_acc"], record["epoch"]
        if record.get("evaluator"):
            self.add_evaluator(record["evaluator"])
        if selection.is_better(record, self.best):
            self.best = {k: record.get(k) for k in ("step", "epoch", "test_acc", "val_acc", "val_loss")}
            return True
        return False

    def add_evaluator(self, result):
        if not isinstance(result.get("accuracy"), (int, float)):
            return
        if self.evaluator is None or result["step"] >= self.evaluator["step"]:
            self.evaluator = result
        if selection.is_better(result, self.ev_best):
            self.ev_best = result                   # the evaluator's best, as its --best-dir chooses


def position(trainer, comm, t_start):
    """Where the run is, for summary()."""
    return dict(step=trainer.step, total_steps=trainer.total_steps, epoch=trainer.epoch + (trainer.pos > 0),
                epochs=trainer.cfg.epochs, ranks=comm.size, wall_seconds=time.perf_counter() - t_start)


def what_was_saved(checkpoint_dir, saved, link, rank0):
    """9.9: say what a stop left behind, and where."""
    if not rank0:
        return "rank 0 writes the checkpoint" if checkpoint_dir else "nothing saved on disk"
    if saved is not None:
        return f"checkpoint {saved} written"
    if link:
        return (f"nothing saved on disk (no --checkpoint-dir); the checkpoint was only served on "
                f"{link.endpoint} until now")
    return "nothing saved (no --checkpoint-dir, no --publish)"


def train_command(argv, size, extra=(), env=None):
    """The lenet-train command line of a run started with `argv` on `size` ranks, with `extra` flags (a
    --resume given before is replaced). In front: srun under a Slurm job step (with its --mpi plugin), else
    mpirun -n N under MPI."""
    env = os.environ if env is None else env
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            if a == "auto":
                continue
        if a == "--resume":
            skip = True
            continue
        if a.startswith("--resume=") or a == "--start-over" or a in extra:
            continue
        out.append(a)
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        mpi = [f"--mpi={env['SLURM_MPI_TYPE']}"] if env.get("SLURM_MPI_TYPE") else []
        front = ["srun", *mpi, "-n", str(size)]
    else:
        front = ["mpirun", "-n", str(size)] if size > 1 else []
    return shlex.join(front + ["lenet-train", *out, *extra])


def _pointer_run(path):
    try:
        return json.loads(read_regular(path, 1 << 20)).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


STEERED = ("early_stop", "not_learning", "control_stop")    # reasons whose one line `why` is the outcome


def summary(facts, *, reason, step, total_steps, epoch, epochs, ranks, wall_seconds, tally, signum=0,
            saved=None, link=None, why=None):
    """The end row: {"event": "end", ...}, fractions as in the epoch rows, paths as strings. `reason`:
    "finished", "signal", or a steering decision ("early_stop", "not_learning") whose one line `why` is
    then the outcome."""
    outcome = "stopped" if reason == "signal" else why if reason in STEERED else "finished"
    s = {"event": "end", "outcome": outcome, "step": step,
         "total_steps": total_steps, "epoch": epoch, "epochs": epochs, "ranks": ranks,
         "wall_seconds": round(wall_seconds, 3), "train_seconds": round(tally.seconds, 3), "images": tally.images,
         "images_per_s": round(tally.images / tally.seconds, 1) if tally.seconds > 0 else None}
    if reason == "signal":
        s["signal"], s["signal_name"] = signum, signal_name(signum)
    if facts.restarts is not None:                  # started by lenet-launch: its count too
        s["restarts"] = facts.restarts
    if tally.test_acc is not None:
        s.update(test_acc=tally.test_acc, last_epoch=tally.last_epoch)
    if tally.best_epoch is not None:
        s.update(best_test_acc=tally.best_test_acc, best_epoch=tally.best_epoch, best_step=tally.best_step)
    ev_best = tally.ev_best
    heard = link.best_result() if link is not None else None     # every result the link heard, not only
    if heard and selection.is_better(heard, ev_best):            # those seen at epoch ends
        ev_best = heard
    if tally.evaluator:
        s["evaluator"] = {"step": tally.evaluator["step"], "accuracy": tally.evaluator["accuracy"]}
        if ev_best:                                 # by selection.py, as the evaluator's --best-dir
            s["evaluator"].update(best_step=ev_best["step"], best_accuracy=ev_best["accuracy"])
    d = facts.checkpoint_dir
    if d:
        s["checkpoint_dir"] = str(d)
        if saved:
            s["checkpoint"] = str(saved)
        for entry in ("last", "best"):              # only this run's (a restarted evaluator's best may be older)
            if _pointer_run(Path(d) / f"{entry}.json") == facts.run_id:
                s[entry] = str(Path(d) / f"{entry}.npz")
    if link:
        s["published"] = link.endpoint
    if facts.metrics and not facts.test_mode:      # test mode's own file is removed when it passes
        s["metrics"] = str(facts.metrics)
    if facts.test_mode:                              # a rehearsal: nothing to go on with
        return s
    if reason in ("signal", "control_stop") and d:
        s["resume_command"] = train_command(facts.argv, ranks, ["--resume"])
    elif reason == "signal":
        s["note"] = ("nothing was saved on disk (no --checkpoint-dir), so this run cannot be resumed; "
                     "to be able to, start it with --checkpoint-dir DIR")
    if d and (s.get("best") or s.get("last")):
        s["evaluate_command"] = shlex.join(["lenet-evaluator", "--watch", str(d), "--once", *facts.data_flags])
    if s.get("best"):
        s["export_command"] = shlex.join(["lenet-export", s["best"], "-o", "lenet.onnx"])
    return s
