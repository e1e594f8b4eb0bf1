"""The evaluator's /metrics in Prometheus' text format (version 0.0.4), from its History and Health, with
the standard library only (served beside /healthz on --health, no extra needed). Names follow Prometheus'
conventions: counters end in _total, times are in seconds, accuracies are ratios (0..1); every per-run
series is labelled run (its name) and run_id. The counters are rebuilt from the --report history at start,
so they survive a restart when the evaluator keeps a report.

    text = metrics_text(history, health)

The per-run figures are run_figures(run), rendered by run_families(): the dashboard's /metrics serves the
same families from the same figures, which the evaluator hands it with the list of runs.
"""
from __future__ import annotations

from lenet_dist.exposition import Family, render

PREFIX = "lenet_evaluator_"

# name, type, help, the figure of a run (RunHistory) or None
PER_RUN = [
    ("evaluations_total", "counter", "checkpoints of this run evaluated", lambda r: r.count),
    ("evaluation_seconds_total", "counter", "seconds spent evaluating this run's checkpoints",
     lambda r: r.eval_seconds_total),
    ("last_evaluation_timestamp_seconds", "gauge", "Unix time of this run's newest evaluation",
     lambda r: r.last["time"]),
    ("step", "gauge", "training step of this run's newest evaluated checkpoint", lambda r: r.last["step"]),
    ("lag_steps", "gauge", "steps the trainer was ahead when the newest checkpoint was evaluated",
     lambda r: r.last["lag_steps"]),
    ("val_accuracy_ratio", "gauge", "validation accuracy of the newest evaluated checkpoint",
     lambda r: r.last["val_accuracy"]),
    ("val_loss", "gauge", "validation loss (cross-entropy) of the newest evaluated checkpoint",
     lambda r: r.last["val_loss"]),
    ("test_accuracy_ratio", "gauge", "test accuracy of the newest evaluated checkpoint",
     lambda r: r.last["test_accuracy"]),
    ("test_loss", "gauge", "test loss (cross-entropy) of the newest evaluated checkpoint",
     lambda r: r.last["test_loss"]),
    ("best_val_accuracy_ratio", "gauge", "validation accuracy of the run's best checkpoint (chosen on validation)",
     lambda r: (r.best or {}).get("val_accuracy")),
    ("best_step", "gauge", "training step of the run's best checkpoint", lambda r: (r.best or {}).get("step")),
    ("run_finished", "gauge", "1 once the run's final checkpoint was evaluated", lambda r: int(r.finished)),
]


def run_figures(run):
    """{name: value} of one run (a RunHistory), PER_RUN's figures by name (None: not known yet), with its
    labels under "labels": JSON-ready, so the dashboard's process can be given them (one source of truth)."""
    if run.last is None:
        return {"labels": {"run": run.name, "run_id": run.run_id or ""}}
    return {"labels": {"run": run.name, "run_id": run.run_id or ""},
            **{name: figure(run) for name, _, _, figure in PER_RUN}}


def run_families(figures):
    """The per-run families (exposition.Family) of `figures`, a list of run_figures() dicts."""
    families = [Family(PREFIX + name, kind, doc, [(f["labels"], f.get(name)) for f in figures])
                for name, kind, doc, _ in PER_RUN]
    return families + [Family(PREFIX + "runs", "gauge", "runs in the evaluator's history", [({}, len(figures))])]


def metrics_text(history, health=None, started=None):
    """The exposition text (str) of every run in `history`, and the process' own state from `health`."""
    families = run_families([run_figures(r) for r in history.runs()])
    if health is not None:
        r = health.report()
        families.append(Family(PREFIX + "ready", "gauge",
                               "1 while the data is loaded and checkpoints are evaluated or awaited",
                               [({}, int(r["ready"]))]))
        families.append(Family(PREFIX + "heartbeat_age_seconds", "gauge", "seconds since the evaluator's loop last turned",
                               [({}, r["heartbeat_age_s"])]))
    if started is not None:
        families.append(Family(PREFIX + "start_time_seconds", "gauge", "Unix time the evaluator started",
                               [({}, started)]))
    return render(families)
