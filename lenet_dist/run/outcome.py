"""How a training run ends: the signal every rank stops for, the tally of what the run reached, the end
row of --metrics and the commands that go on from there (resume, evaluate, export)."""
from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path

import numpy as np

from lenet_dist.stopsignal import signal_name


def agreed_signal(comm, mine):
    """The signal the job stops for, the same on every rank: the one the lowest-numbered rank received.
    A rank that stops because a peer asked has received none (0) itself. One allgather; every rank calls
    it once, right after the step in which they agreed to stop."""
    got = comm.allgather(np.array([mine], np.int64))[:, 0]                 # [dist]
    received = got[got > 0]
    return int(received[0]) if len(received) else int(mine)


class Tally:
    """What the run reached, kept by rank 0: images and seconds trained, the test accuracy of the last
    and of the best epoch (and the best's checkpoint), the evaluator's latest and best verdicts. "Best" is
    by validation accuracy only (choosing on the test set would flatter its test figure); with no
    validation split (--val-size 0) no epoch is chosen."""

    def __init__(self, best_json=None, run_id=None):
        self.images, self.seconds = 0, 0.0
        self.test_acc = self.last_epoch = None
        self.best_test_acc, self.best_epoch, self.best_step = -1.0, None, None
        self.best_val_acc = -1.0
        self.evaluator = None
        self.ev_best = None
        if best_json is not None:                  # --resume: the best so far stays the best to beat
            try:
                b = json.loads(Path(best_json).read_text())
                if b.get("run_id") != run_id:
                    raise ValueError("another run's best")
                self.best_test_acc, self.best_epoch, self.best_step = float(b["test_acc"]), int(b["epoch"]), \
                    int(b["step"])
                self.best_val_acc = float(b["val_acc"])
            except (OSError, ValueError, KeyError, TypeError):
                pass

    def add_training(self, images, seconds):
        self.images += images
        self.seconds += seconds

    def add_epoch(self, record):
        """Returns True when this epoch's validation accuracy is the best so far."""
        self.test_acc, self.last_epoch = record["test_acc"], record["epoch"]
        if record.get("evaluator"):
            self.add_evaluator(record["evaluator"])
        if "val_acc" in record and record["val_acc"] > self.best_val_acc:
            self.best_test_acc, self.best_epoch, self.best_step = record["test_acc"], record["epoch"], record["step"]
            self.best_val_acc = record["val_acc"]
            return True
        return False

    def add_evaluator(self, result):
        if not isinstance(result.get("accuracy"), (int, float)):
            return
        if self.evaluator is None or result["step"] >= self.evaluator["step"]:
            self.evaluator = result
        if isinstance(result.get("val_accuracy"), (int, float)) and \
                (self.ev_best is None or result["val_accuracy"] > self.ev_best["val_accuracy"]):
            self.ev_best = result                   # the evaluator's best, by validation like its --best-dir


def position(trainer, comm, t_start):
    """Where the run is, for summary()."""
    return dict(step=trainer.step, total_steps=trainer.total_steps, epoch=trainer.epoch + (trainer.pos > 0),
                epochs=trainer.cfg.epochs, ranks=comm.size, wall_seconds=time.perf_counter() - t_start)


def what_was_saved(args, saved, link, rank0):
    """9.9: say what a stop left behind, and where."""
    if not rank0:
        return "rank 0 writes the checkpoint" if args.checkpoint_dir else "nothing saved on disk"
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


def data_flags(args):
    """The flags that name this run's data, for another program (lenet-evaluator) to read the same."""
    if args.subset:
        return ["--subset"]
    flags = [f"--dataset={args.dataset}"] if args.dataset != "mnist" else []
    return flags + ([f"--data-dir={args.data_dir}"] if args.data_dir else [])


def _pointer_run(path):
    try:
        return json.loads(path.read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def summary(args, *, reason, step, total_steps, epoch, epochs, ranks, wall_seconds, tally, signum=0,
            saved=None, link=None):
    """The end row: {"event": "end", ...}, fractions as in the epoch rows, paths as strings."""
    s = {"event": "end", "outcome": "stopped" if reason == "signal" else "finished", "step": step,
         "total_steps": total_steps, "epoch": epoch, "epochs": epochs, "ranks": ranks,
         "wall_seconds": round(wall_seconds, 3), "train_seconds": round(tally.seconds, 3), "images": tally.images,
         "images_per_s": round(tally.images / tally.seconds, 1) if tally.seconds > 0 else None}
    if reason == "signal":
        s["signal"], s["signal_name"] = signum, signal_name(signum)
    if os.environ.get("LENET_LAUNCH_RESTARTS", "").isdigit():      # started by lenet-launch: its count too
        s["restarts"] = int(os.environ["LENET_LAUNCH_RESTARTS"])
    if tally.test_acc is not None:
        s.update(test_acc=tally.test_acc, last_epoch=tally.last_epoch)
    if tally.best_epoch is not None:
        s.update(best_test_acc=tally.best_test_acc, best_epoch=tally.best_epoch, best_step=tally.best_step)
    if tally.evaluator:
        s["evaluator"] = {"step": tally.evaluator["step"], "accuracy": tally.evaluator["accuracy"]}
        if tally.ev_best:                           # chosen on validation: none without a split
            s["evaluator"].update(best_step=tally.ev_best["step"], best_accuracy=tally.ev_best["accuracy"])
    d = args.checkpoint_dir
    if d:
        s["checkpoint_dir"] = str(d)
        if saved:
            s["checkpoint"] = str(saved)
        for entry in ("last", "best"):              # only this run's (a restarted evaluator's best may be older)
            if _pointer_run(Path(d) / f"{entry}.json") == getattr(args.run_state, "run_id", None):
                s[entry] = str(Path(d) / f"{entry}.npz")
    if link:
        s["published"] = link.endpoint
    if args.metrics and not args.test_mode:        # test mode's own file is removed when it passes
        s["metrics"] = str(args.metrics)
    if args.test_mode:                              # a rehearsal: nothing to go on with
        return s
    if reason == "signal" and d:
        s["resume_command"] = train_command(args.argv, ranks, ["--resume"])
    elif reason == "signal":
        s["note"] = ("nothing was saved on disk (no --checkpoint-dir), so this run cannot be resumed; "
                     "to be able to, start it with --checkpoint-dir DIR")
    if d and (s.get("best") or s.get("last")):
        s["evaluate_command"] = shlex.join(["lenet-evaluator", "--watch", str(d), "--once", *data_flags(args)])
    if s.get("best"):
        s["export_command"] = shlex.join(["lenet-export", s["best"], "-o", "lenet.onnx"])
    return s
