"""Decisions that steer a run from its validation figures: early stopping, the plateau learning-rate
schedule, and the verdict that a run is not learning. Pure: no MPI, no files, no clock.

Every rank feeds the same figures (the trainer's collective validation at an epoch's end) in the same order,
so every rank takes the same decisions at the same step without a message; the evaluator's verdicts reach
rank 0 alone, whose decision travels as the stop vote of the next step's allreduce (workers/trainer.py).
The whole state is a small JSON dict saved in every checkpoint: a resumed run decides as the uninterrupted
one would (docs/steering.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

CHANCE = 0.1                    # ten classes
CHANCE_FACTOR = 1.5             # accuracy at or below 1.5x chance counts as "not learning"
CHANCE_EVALUATIONS = 2          # ... at this many evaluations in a row
LOSS_EVALUATIONS = 3            # a training loss not below its first evaluation's for this many evaluations
MIN_STEPS = 100                 # the learning check waits for this many steps (tiny runs are left alone)
LINEAR_BASE_BATCH = 64          # --lr-scaling linear: lr = --lr * global batch / 64 (Goyal et al. 2017)
NAMES = {"val_accuracy": ("val_accuracy", "val_acc"), "val_loss": ("val_loss",)}


def lr_factor(cfg):
    """The linear scaling rule's factor on --lr (1 without it)."""
    return cfg.batch_size / LINEAR_BASE_BATCH if cfg.lr_scaling == "linear" else 1.0


class Watch:
    """One validation metric over evaluations: the best value, its step, evaluations since it improved.
    Improving means better than the best by more than `min_delta` (higher accuracy, lower loss)."""

    def __init__(self, metric, min_delta):
        self.metric, self.min_delta = metric, min_delta
        self.best, self.best_step, self.since = None, None, 0

    def figure(self, record):
        for name in NAMES[self.metric]:
            v = record.get(name)
            if isinstance(v, (int, float)) and math.isfinite(v):
                return float(v)
        return None

    def observe(self, record, step):
        """-> True (improved), False (did not), None (`record` has no such figure: not an evaluation)."""
        v = self.figure(record)
        if v is None:
            return None
        sign = 1.0 if self.metric == "val_accuracy" else -1.0
        if self.best is None or sign * (v - self.best) > self.min_delta:
            self.best, self.best_step, self.since = v, step, 0
            return True
        self.since += 1
        return False

    def state(self):
        return {"best": self.best, "best_step": self.best_step, "since": self.since}

    def load(self, s):
        self.best, self.best_step, self.since = s["best"], s["best_step"], int(s["since"])


@dataclass
class Decision:
    """What an evaluation decided: the run ends (`end`: "early_stop" | "not_learning", `why`: its one
    line), and/or the learning rate changed (`lr_row`: the --metrics row that records it)."""
    end: str | None = None
    why: str | None = None
    lr_row: dict | None = None


class Steering:
    """The decisions of one run. `from_evaluator`: early stopping follows the evaluator's verdicts (rank 0,
    after_verdict) instead of the trainer's own validation."""

    def __init__(self, cfg, from_evaluator=False):
        self.cfg, self.from_evaluator = cfg, from_evaluator
        self.factor = lr_factor(cfg)
        self.scale = 1.0                            # the plateau schedule's factor, dropped by plateau_factor
        self.control_scale = 1.0                    # the product of the lr_scale actions of live control
        self.plateau = Watch(cfg.early_stop_metric, cfg.min_delta)
        self.early = Watch(cfg.early_stop_metric, cfg.min_delta)
        self.chance_runs = 0                        # evaluations in a row at chance level
        self.first_loss, self.loss_runs = None, 0   # the first evaluation's training loss; evaluations not below
        self.verdict_step = -1                      # the newest step an evaluator verdict was about
        self.ended = None                           # the one line of the decision that ended the run

    @property
    def lr_scale(self):
        """What the step multiplies the schedule's learning rate by."""
        return self.factor * self.scale * self.control_scale

    def after_control(self, action):
        """Every rank, a live-control action agreed after a step (run/control.py): lr_scale multiplies the
        learning rate from the next step on."""
        if action["action"] == "lr_scale":
            self.control_scale *= action["value"]

    def source(self):
        if not self.cfg.early_stop:
            return None
        return ("the evaluator's verdicts (--publish)" if self.from_evaluator
                else "the trainer's own validation at each epoch's end")

    def after_validation(self, record, step, epochs_done, peak_lr, last=False):
        """Every rank, at an epoch's end, with the collective figures (`record`: val_acc, val_loss,
        train_loss, train_acc) -> Decision. `last`: the run ends here anyway (no early stop to call)."""
        d = Decision()
        if self.cfg.schedule == "plateau" and self.plateau.observe(record, step) is False \
                and self.plateau.since >= self.cfg.plateau_patience:
            self.plateau.since = 0
            floor = self.cfg.min_lr / (self.cfg.lr * self.factor)
            new = max(self.scale * self.cfg.plateau_factor, floor)
            if new < self.scale:
                self.scale = new
                d.lr_row = {"event": "lr", "step": step, "lr": peak_lr * self.lr_scale, "scale": self.scale,
                            "reason": f"plateau: no improvement in {self.cfg.early_stop_metric} for "
                                      f"{_evaluations(self.cfg.plateau_patience)} since step {self.plateau.best_step}"}
        if self.cfg.early_stop and not self.from_evaluator and not last:
            d.why = self._early(record, step)
            d.end = d.why and "early_stop"
        if d.end is None:
            d.why = self._learning(record, step, epochs_done)
            d.end = d.why and "not_learning"
        if d.end:
            self.ended = d.why
        return d

    def after_verdict(self, result):
        """Rank 0, each evaluator verdict in step order -> the one line that ends the run, or None."""
        step = int(result.get("step", 0))
        if step <= self.verdict_step:               # a verdict about an older checkpoint than one judged
            return None
        self.verdict_step = step
        why = self._early(result, step)
        if why:
            self.ended = why
        return why

    def _early(self, record, step):
        if self.early.observe(record, step) is False and self.early.since >= self.cfg.early_stop:
            return (f"early stop: no improvement in {self.cfg.early_stop_metric} for "
                    f"{_evaluations(self.early.since)} since step {self.early.best_step}")
        return None

    def _learning(self, record, step, epochs_done):
        if not self.cfg.learning_check or step < MIN_STEPS:
            return None
        val = record.get("val_acc")
        acc, what = (val, "validation") if isinstance(val, (int, float)) else (record.get("train_acc"), "training")
        self.chance_runs = self.chance_runs + 1 if acc is not None and acc <= CHANCE_FACTOR * CHANCE else 0
        loss = record.get("train_loss")
        if self.first_loss is None:
            self.first_loss = loss
        elif loss is not None:
            self.loss_runs = self.loss_runs + 1 if not loss < self.first_loss else 0
        ep = f"{epochs_done} epoch{'s' if epochs_done != 1 else ''}"
        if self.chance_runs >= CHANCE_EVALUATIONS:
            said = f"{what} accuracy {100 * acc:.1f}% after {ep} (chance is {100 * CHANCE:.0f}%)"
        elif self.loss_runs >= LOSS_EVALUATIONS:
            said = f"training loss {loss:.4g} after {ep}, not below its {self.first_loss:.4g} of the first evaluation"
        else:
            return None
        return f"{said}: the run is not learning; {self.suggestion()}"

    def suggestion(self):
        cfg = self.cfg
        peak = cfg.lr * self.factor
        small = cfg.lr_scaling != "linear" and cfg.batch_size < LINEAR_BASE_BATCH
        lr = cfg.lr * cfg.batch_size / LINEAR_BASE_BATCH if small else peak / 10
        tip = f"try --lr {lr:.3g}"
        if cfg.lr_scaling != "linear" and cfg.batch_size != LINEAR_BASE_BATCH:
            tip += ", or --lr-scaling linear"
        return tip

    def state(self):
        return {"scale": self.scale, "plateau": self.plateau.state(), "early_stop": self.early.state(),
                "chance_runs": self.chance_runs, "first_loss": self.first_loss, "loss_runs": self.loss_runs,
                "verdict_step": self.verdict_step, "ended": self.ended, "control_scale": self.control_scale}

    def load(self, s):
        """A checkpoint's state (None: an older checkpoint, decided nothing yet)."""
        if not s:
            return
        self.scale = float(s["scale"])
        self.plateau.load(s["plateau"])
        self.early.load(s["early_stop"])
        self.chance_runs, self.loss_runs = int(s["chance_runs"]), int(s["loss_runs"])
        self.first_loss, self.ended = s["first_loss"], s.get("ended")
        self.verdict_step = int(s.get("verdict_step", -1))
        self.control_scale = float(s.get("control_scale", 1.0))


def _evaluations(n):
    return f"{n} evaluation{'s' if n != 1 else ''}"
