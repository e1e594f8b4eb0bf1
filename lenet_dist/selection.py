"""The one rule for "best": which evaluated model a run keeps, serves and reports.

A model is chosen on the validation split, never on the test set: higher validation accuracy wins; a tie
goes to the lower validation loss; a tie on both goes to the later step (on a small validation split many
epochs tie on accuracy, and the later model has trained longer on the same evidence). A record without a
validation figure (a run with --val-size 0) is never better than one with it; among such records the later
step wins, so "best" degrades to "last" rather than to a choice on the test set.

Used by the trainer's summary and best.npz, the evaluator's --best-dir and report, the results on the wire,
the dashboard, /metrics and predict?model=best. Records are dicts with "step" and the validation figures
under the evaluator's names ("val_accuracy", "val_loss"); the trainer's epoch rows ("val_acc") are read too.
"""
from __future__ import annotations

import math


def _figure(record, *names):
    for n in names:
        v = record.get(n)
        if v is not None:
            try:
                v = float(v)
            except (TypeError, ValueError):
                return None
            return v if math.isfinite(v) else None
    return None


def rank_key(record: dict) -> tuple:
    """A sort key: the larger key is the better model under the rule above."""
    acc = _figure(record, "val_accuracy", "val_acc")
    loss = _figure(record, "val_loss")
    return (acc is not None, acc if acc is not None else 0.0,
            -loss if (acc is not None and loss is not None) else -math.inf, int(record.get("step", -1)))


def is_better(candidate: dict, incumbent: dict | None) -> bool:
    """True when `candidate` should replace `incumbent` (None: nothing kept yet) as the best."""
    return incumbent is None or rank_key(candidate) > rank_key(incumbent)


def best_of(records) -> dict | None:
    """The best of `records` (an iterable of dicts), or None when there are none."""
    best = None
    for r in records:
        if is_better(r, best):
            best = r
    return best
