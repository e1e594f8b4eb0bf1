"""/metrics: the dashboard's figures in Prometheus' text format, by prometheus_client, read from the
LiveState at scrape time (a collector, so there is no second copy of any figure to keep in step)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily


class _StateCollector:
    def __init__(self, state):
        self.state = state

    def collect(self):
        s = self.state.summary()
        ev, step, best = s["latest_evaluation"] or {}, s["latest_step"] or {}, s["best"] or {}
        figures = [
            ("lenet_eval_accuracy", "test accuracy of the newest evaluated checkpoint (fraction)", ev.get("accuracy")),
            ("lenet_eval_loss", "test loss of the newest evaluated checkpoint", ev.get("loss")),
            ("lenet_eval_step", "training step of the newest evaluated checkpoint", ev.get("step")),
            ("lenet_eval_lag_steps", "how many steps the trainer was ahead when it was evaluated", ev.get("lag_steps")),
            ("lenet_eval_seconds", "seconds the newest evaluation took", ev.get("eval_seconds")),
            ("lenet_eval_val_accuracy", "validation accuracy of the newest evaluated checkpoint (fraction)",
             ev.get("val_accuracy")),
            ("lenet_eval_val_loss", "validation loss of the newest evaluated checkpoint", ev.get("val_loss")),
            ("lenet_eval_best_step", "training step of the best checkpoint (chosen on validation)", best.get("step")),
            ("lenet_eval_best_val_accuracy", "validation accuracy of the best checkpoint (fraction)",
             best.get("val_accuracy")),
            ("lenet_eval_best_val_loss", "validation loss of the best checkpoint", best.get("val_loss")),
            ("lenet_eval_best_accuracy", "test accuracy of the best checkpoint, chosen on validation (fraction)",
             best.get("accuracy")),
            ("lenet_evaluations", "checkpoints evaluated since the evaluator started", s["evaluations"]),
            ("lenet_train_step", "the trainer's newest step as last heard", s["trainer_step"] if s["trainer_step"] >= 0 else None),
            ("lenet_train_loss", "training loss over the last telemetry window", step.get("loss")),
            ("lenet_train_accuracy", "training accuracy over the last telemetry window", step.get("acc")),
            ("lenet_train_images_per_second", "training images per second, all ranks", step.get("images_per_s")),
            ("lenet_train_learning_rate", "the learning rate", step.get("lr")),
        ]
        for name, doc, value in figures:
            g = GaugeMetricFamily(name, doc)
            if value is not None:
                g.add_metric([], float(value))
            yield g


def metrics_text(state):
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StateCollector(state))
    return generate_latest(registry)
