"""/metrics on the dashboard's port: the evaluator's per-run families (evaluation/metrics.py), rendered from
the very figures the evaluator computed and handed over with its list of runs, so the two /metrics never
disagree on a name or a value; then the older unlabelled names of the shown run, deprecated until 2027-06
(docs/dashboard.md), read from the LiveState at scrape time.
"""
from __future__ import annotations

from lenet_dist.evaluation.metrics import run_families
from lenet_dist.exposition import Family, render

DEPRECATED_UNTIL = "2027-06"

# old name, help, the figure from LiveState.summary() (its newest evaluation, newest step row, best)
DEPRECATED = [
    ("lenet_eval_accuracy", "test accuracy of the newest evaluated checkpoint (fraction)",
     lambda ev, st, best, s: ev.get("accuracy")),
    ("lenet_eval_loss", "test loss of the newest evaluated checkpoint", lambda ev, st, best, s: ev.get("loss")),
    ("lenet_eval_step", "training step of the newest evaluated checkpoint", lambda ev, st, best, s: ev.get("step")),
    ("lenet_eval_lag_steps", "how many steps the trainer was ahead when it was evaluated",
     lambda ev, st, best, s: ev.get("lag_steps")),
    ("lenet_eval_seconds", "seconds the newest evaluation took", lambda ev, st, best, s: ev.get("eval_seconds")),
    ("lenet_eval_val_accuracy", "validation accuracy of the newest evaluated checkpoint (fraction)",
     lambda ev, st, best, s: ev.get("val_accuracy")),
    ("lenet_eval_val_loss", "validation loss of the newest evaluated checkpoint",
     lambda ev, st, best, s: ev.get("val_loss")),
    ("lenet_eval_best_step", "training step of the best checkpoint (chosen on validation)",
     lambda ev, st, best, s: best.get("step")),
    ("lenet_eval_best_val_accuracy", "validation accuracy of the best checkpoint (fraction)",
     lambda ev, st, best, s: best.get("val_accuracy")),
    ("lenet_eval_best_val_loss", "validation loss of the best checkpoint", lambda ev, st, best, s: best.get("val_loss")),
    ("lenet_eval_best_accuracy", "test accuracy of the best checkpoint, chosen on validation (fraction)",
     lambda ev, st, best, s: best.get("accuracy")),
    ("lenet_evaluations", "checkpoints of the shown run evaluated", lambda ev, st, best, s: s["evaluations"]),
    ("lenet_train_step", "the trainer's newest step as last heard",
     lambda ev, st, best, s: s["trainer_step"] if s["trainer_step"] >= 0 else None),
    ("lenet_train_loss", "training loss over the last telemetry window", lambda ev, st, best, s: st.get("loss")),
    ("lenet_train_accuracy", "training accuracy over the last telemetry window", lambda ev, st, best, s: st.get("acc")),
    ("lenet_train_images_per_second", "training images per second, all ranks",
     lambda ev, st, best, s: st.get("images_per_s")),
    ("lenet_train_learning_rate", "the learning rate", lambda ev, st, best, s: st.get("lr")),
]


def metrics_text(state):
    """The exposition text (str) of the dashboard's LiveState."""
    figures = [r["metrics"] for r in state.runs()["runs"] if isinstance(r.get("metrics"), dict)]
    s = state.summary()
    ev, st, best = s["latest_evaluation"] or {}, s["latest_step"] or {}, s["best"] or {}
    old = [Family(name, "gauge", f"{doc}; deprecated, removed after {DEPRECATED_UNTIL} (docs/dashboard.md)",
                  [({}, figure(ev, st, best, s))]) for name, doc, figure in DEPRECATED]
    return render(run_families(figures) + old)
