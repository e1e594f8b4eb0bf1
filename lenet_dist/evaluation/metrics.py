"""The evaluator's /metrics in Prometheus' text format (version 0.0.4), from its History and Health, with
the standard library only (served beside /healthz on --health, no extra needed). Names follow Prometheus'
conventions: counters end in _total, times are in seconds, accuracies are ratios (0..1); every per-run
series is labelled run (its name) and run_id. The counters are rebuilt from the --report history at start,
so they survive a restart when the evaluator keeps a report.

    text = metrics_text(history, health)
"""
from __future__ import annotations

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


def _label(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v):
    return repr(float(v))


def metrics_text(history, health=None, started=None):
    """The exposition text (str) of every run in `history`, and the process' own state from `health`."""
    lines = []

    def family(name, kind, doc, samples):
        lines.append(f"# HELP {PREFIX}{name} {doc}")
        lines.append(f"# TYPE {PREFIX}{name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            lines.append(f"{PREFIX}{name}{{{text}}} {_number(value)}" if text else f"{PREFIX}{name} {_number(value)}")

    runs = history.runs()
    for name, kind, doc, figure in PER_RUN:
        samples = []
        for r in runs:
            if r.last is None:
                continue
            v = figure(r)
            if v is not None:
                samples.append(({"run": r.name, "run_id": r.run_id or ""}, v))
        family(name, kind, doc, samples)
    family("runs", "gauge", "runs in the evaluator's history", [({}, len(runs))])
    if health is not None:
        r = health.report()
        family("ready", "gauge", "1 while the data is loaded and checkpoints are evaluated or awaited",
               [({}, int(r["ready"]))])
        family("heartbeat_age_seconds", "gauge", "seconds since the evaluator's loop last turned",
               [({}, r["heartbeat_age_s"])])
    if started is not None:
        family("start_time_seconds", "gauge", "Unix time the evaluator started", [({}, started)])
    return "\n".join(lines) + "\n"
