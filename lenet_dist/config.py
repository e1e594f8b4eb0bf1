"""The one training configuration: filled from flags, saved in every checkpoint, unknown keys rejected."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

from lenet_dist.nn.optim import SCHEDULES
from lenet_dist.parallel.halfprec import DTYPES

OPTIONAL = {"bucket_kb": int}       # fields that may also be None, and their type otherwise
METRICS = ("val_accuracy", "val_loss")
LR_SCALINGS = ("none", "linear")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5                 # passes over the training set
    batch_size: int = 64            # the GLOBAL batch, split across ranks
    lr: float = 0.07                # peak learning rate (after warm-up); 0.07 for the 5-epoch default's
                                    # accuracy on 1 and 2 ranks (docs/performance.md)
    momentum: float = 0.9           # SGD momentum
    nesterov: bool = True           # Nesterov momentum
    weight_decay: float = 2e-3      # L2 penalty, applied to every parameter (the shifts below want more of it)
    schedule: str = "cosine"        # constant | step | cosine
    warmup_epochs: float = 0.2      # linear warm-up from 0 to lr over this many epochs
    step_epochs: int = 2            # 'step' schedule: decay every this many epochs ...
    gamma: float = 0.1              # ... by this factor
    augment_shift: int = 1          # random translations of up to this many pixels (0 = off); on by default,
                                    # with weight_decay, for the accuracy docs/performance.md measures
    label_smoothing: float = 0.0    # training's target: 1 - this on the label plus this/10 on every class;
                                    # the loss it reports is that smoothed one, evaluation's stays plain
    seed: int = 0                   # model init, data order and augmentation all derive from it
    deterministic: bool = False     # bit-identical results at any rank count (fixed-point reduction)
    micro_batch: int = 16           # deterministic mode: examples per fixed-size gradient chunk
    balance: bool = False           # shards follow each rank's measured speed (see parallel/balance.py)
    train_subset: int = 0           # use only the first N training examples (0 = all)
    bucket_kb: int | None = None    # gradients reduced in buckets of >= this many KiB, each started as soon
                                    # as backward has produced it (parallel/buckets.py); 0 = one fused allreduce;
                                    # -1: 64 KiB buckets or fused, whichever the first steps measure faster;
                                    # None: by placement (parallel/placement.py): 64 across nodes or half,
                                    # else one non-blocking allreduce after backward
    allreduce_dtype: str = "float32"  # float16 | bfloat16: gradients travel in half precision (parallel/compressed.py)
    val_size: int = -1              # examples held out of those for validation (-1: 1/12 of them; data/split.py)
    # steering from validation (run/steering.py, docs/steering.md)
    early_stop: int = 0             # stop after this many evaluations without improvement (0 = never)
    early_stop_metric: str = "val_accuracy"  # val_accuracy | val_loss: what early stop and plateau watch
    min_delta: float = 0.0          # an improvement must beat the best by more than this
    plateau_factor: float = 0.1     # 'plateau' schedule: the learning rate is multiplied by this ...
    plateau_patience: int = 2       # ... after this many evaluations without improvement
    min_lr: float = 0.0             # ... but never below this
    lr_scaling: str = "none"        # linear: lr = --lr * batch_size / 64 (Goyal et al. 2017), with the warm-up
    learning_check: bool = True     # a run stuck at chance level (or whose loss does not fall) stops, saying so

    def __post_init__(self):
        for f in fields(self):
            v, kind = getattr(self, f.name), OPTIONAL.get(f.name, type(f.default))
            if v is None and f.name in OPTIONAL:
                continue
            ok = (isinstance(v, bool) if kind is bool else
                  isinstance(v, (int, float)) and not isinstance(v, bool) if kind is float else
                  isinstance(v, int) and not isinstance(v, bool) if kind is int else isinstance(v, kind))
            if not ok:
                raise ValueError(f"{f.name} must be of type {kind.__name__}, got {v!r}")
            if kind is float and not math.isfinite(v):
                raise ValueError(f"{f.name} must be a finite number, got {v!r}")
        checks = [
            (self.epochs >= 1, "epochs", "an integer >= 1"),
            (self.batch_size >= 1, "batch_size", "an integer >= 1"),
            (self.lr > 0, "lr", "a number > 0"),
            (0 <= self.momentum < 1, "momentum", "in [0, 1)"),
            (self.momentum > 0 or not self.nesterov, "momentum", "> 0 with Nesterov momentum (or --no-nesterov)"),
            (self.weight_decay >= 0, "weight_decay", ">= 0"),
            (self.schedule in SCHEDULES, "schedule", " | ".join(SCHEDULES)),
            (self.warmup_epochs >= 0, "warmup_epochs", ">= 0"),
            (self.step_epochs >= 1, "step_epochs", "an integer >= 1"),
            (0 < self.gamma <= 1, "gamma", "in (0, 1]"),
            (0 <= self.augment_shift <= 4, "augment_shift", "an integer in [0, 4]"),
            (0 <= self.label_smoothing < 1, "label_smoothing", "in [0, 1)"),
            (self.micro_batch >= 1, "micro_batch", "an integer >= 1"),
            (self.train_subset >= 0, "train_subset", ">= 0"),
            (self.bucket_kb is None or self.bucket_kb >= -1, "bucket_kb",
             "an integer >= 0 (0: one fused allreduce), -1 (measured) or None (by placement)"),
            (self.allreduce_dtype in DTYPES, "allreduce_dtype", " | ".join(DTYPES)),
            (self.val_size >= -1, "val_size", ">= 0, or -1 for the default"),
            (self.early_stop >= 0, "early_stop", "an integer >= 0 (0: off)"),
            (self.early_stop_metric in METRICS, "early_stop_metric", " | ".join(METRICS)),
            (self.min_delta >= 0, "min_delta", ">= 0"),
            (0 < self.plateau_factor < 1, "plateau_factor", "in (0, 1)"),
            (self.plateau_patience >= 1, "plateau_patience", "an integer >= 1"),
            (self.min_lr >= 0, "min_lr", ">= 0"),
            (self.lr_scaling in LR_SCALINGS, "lr_scaling", " | ".join(LR_SCALINGS)),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")
        if self.allreduce_dtype != "float32" and (self.deterministic or self.bucket_kb == 0):
            raise ValueError(f"allreduce_dtype {self.allreduce_dtype} needs the bucketed float allreduce "
                             f"(bucket_kb > 0, not deterministic), got bucket_kb={self.bucket_kb}, "
                             f"deterministic={self.deterministic}")

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)
