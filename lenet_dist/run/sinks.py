"""Where a training run's outputs go. The epoch loop calls one small interface, never a branch per output:

    sinks = Sinks([ProgressSink(...), MetricsSink(path), ...])    # rank 0; other ranks: Sinks([])
    sinks.on_start(info)          # once, before the first step: RunInfo
    sinks.on_step(state)          # after every step: StepState (one object, updated in place)
    sinks.on_epoch(record)        # after every epoch: the epoch record (the dict written to --metrics)
    sinks.on_end(summary)         # once, when the run ends (finished or stopped): a dict
    sinks.close()                 # always, also after an error

A new output (TensorBoard, step telemetry on the evaluator link, ...) is one more small class here or in
its own module; the loop does not change. on_step runs every step: keep it to a few attribute reads
and a comparison, and do real work only every K steps or every few seconds.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from lenet_dist.run.metrics import MetricsFile

log = logging.getLogger("lenet.trainer")


@dataclass
class RunInfo:
    """What a sink may want to know before the first step."""
    total_steps: int            # steps of the whole run
    start_step: int             # > 0 after --resume
    steps_per_epoch: int
    epochs: int
    ranks: int
    batch_size: int             # the global batch
    config: dict = field(default_factory=dict)   # TrainConfig.to_dict()


class StepState:
    """The step that just finished, as the loop sees it on rank 0. One instance, overwritten every step:
    a sink that keeps figures copies them. Sums are over the whole global batch (all ranks)."""
    __slots__ = ("step", "epoch", "batch", "loss_sum", "correct", "lr", "time", "step_seconds",
                 "compute_seconds", "epoch_seen", "epoch_loss_sum", "epoch_correct")

    def __init__(self):
        self.step = 0               # steps done so far in the run (1 after the first step)
        self.epoch = 0              # 0-based epoch this step belonged to
        self.batch = 0              # examples in this step's global batch
        self.loss_sum = 0.0         # sum of the per-example losses of this step
        self.correct = 0            # examples of this step classified correctly
        self.lr = 0.0               # the learning rate this step used
        self.time = 0.0             # time.perf_counter() when the step finished
        self.step_seconds = 0.0     # wall seconds of the step on rank 0 (compute + allreduce + update)
        self.compute_seconds = None  # per-rank seconds spent computing this step's shard (ndarray, a view:
                                     # copy it); a rank's wait is about step_seconds - compute_seconds[r]
        self.epoch_seen = 0         # running totals over the epoch so far
        self.epoch_loss_sum = 0.0
        self.epoch_correct = 0

    def begin_epoch(self, epoch, now):
        self.epoch, self.time = epoch, now
        self.epoch_seen, self.epoch_loss_sum, self.epoch_correct = 0, 0.0, 0

    def add(self, step, batch, loss_sum, correct, lr, compute_seconds, now):
        self.step, self.batch, self.loss_sum, self.correct, self.lr = step, batch, loss_sum, correct, lr
        self.compute_seconds = compute_seconds
        self.step_seconds, self.time = now - self.time, now
        self.epoch_seen += batch
        self.epoch_loss_sum += loss_sum
        self.epoch_correct += correct


class Sink:
    """Base class: every hook does nothing, so a sink overrides only what it uses."""

    def on_start(self, info: RunInfo):
        pass

    def on_step(self, s: StepState):
        pass

    def on_epoch(self, record: dict):
        pass

    def on_event(self, row: dict):
        """A row of its own (a learning-rate drop: {"event": "lr", ...}), between the epoch rows."""

    def on_end(self, summary: dict):
        pass

    def close(self):
        pass


class Sinks(Sink):
    """Fan-out to several sinks, in order. close() reaches every sink even if one of them fails."""

    def __init__(self, sinks=()):
        self.sinks = list(sinks)

    def on_start(self, info):
        for s in self.sinks:
            s.on_start(info)

    def on_step(self, state):
        for s in self.sinks:
            s.on_step(state)

    def on_epoch(self, record):
        for s in self.sinks:
            s.on_epoch(record)

    def on_event(self, row):
        for s in self.sinks:
            if hasattr(s, "on_event"):         # duck-typed sinks without the hook ignore such rows
                s.on_event(row)

    def on_end(self, summary):
        for s in self.sinks:
            s.on_end(summary)

    def close(self):
        errors = []
        for s in self.sinks:
            try:
                s.close()
            except Exception as e:  # noqa: BLE001 - close the others, then report the first failure
                errors.append(e)
        if errors:
            raise errors[0]


class MetricsSink(Sink):
    """--metrics: one JSON object per line, appended and flushed as it happens (run/metrics.py)."""

    def __init__(self, path):
        self.path = path
        self.file = MetricsFile(path)

    def write(self, record):
        self.file.write(record)

    def on_epoch(self, record):
        self.write(record)

    def on_event(self, row):
        self.write(row)

    def on_end(self, summary):
        self.write(summary)

    def close(self):
        self.file.close()


class LinkProgressSink(Sink):
    """Tells the evaluator link how far training is, so that evaluators' lag counts unpublished steps."""

    def __init__(self, link):
        self.link = link

    def on_step(self, s):
        self.link.progress(s.step)
