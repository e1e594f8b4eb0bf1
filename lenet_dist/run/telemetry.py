"""--log-every K: rank 0's step telemetry, one row every K steps, for the --metrics JSONL, the evaluator
link (a remote evaluator's dashboard sees training live) and TensorBoard.

    {"event": "step", "step": 120, "epoch": 1, "time": 1795900000.1, "steps": 10, "seconds": 0.41,
     "loss": 0.312, "acc": 0.91, "lr": 0.05, "images_per_s": 1561.0,
     "rank_images_per_s": [781.0, 780.0], "rank_compute_s": [0.30, 0.31], "rank_wait_s": [0.11, 0.10]}

epoch is the epoch the step belongs to, counted from 1 as on the console and in the epoch rows (an epoch row's
epoch is the one it ends); loss and acc are over the K steps' examples (all ranks); seconds is the K steps' wall time on rank 0
(not counting the test evaluation and checkpoint at an epoch's end); a rank's wait is that time less its
compute time (allreduce, the update, waiting for the others).
The first row also carries the run's "config". on_step does a few additions per step; the row is built
every K steps only (bench/telemetry_cost.py measures what it costs).

Rows of the run's own that a chart marks (on_event): "lr" (a plateau drop, run/steering.py), "control" (a
command from outside: stop, pause, resume, checkpoint, lr_scale) and "timeline" (the per-rank phase seconds of
a --timeline window) go to the event outputs as they come, each with an integer "step" (the link needs one).
"""
from __future__ import annotations

import time

import numpy as np

DEFAULT_EVERY = 10
EVENTS = ("lr", "control", "timeline")      # the rows on_event forwards


class TelemetrySink:
    """A sink (see sinks.py) that hands a row to each of `outputs` (callables) every `every` steps.
    `rank_examples()`, optional, returns the examples each rank has done since the loop last reset them
    (at each epoch start): the per-rank images/s come from it. `event_outputs` get the EVENTS rows: those of
    the step rows' outputs that do not have them already (--metrics writes them through its own on_event)."""

    def __init__(self, every, outputs, rank_examples=None, event_outputs=()):
        if every < 1:
            raise ValueError(f"--log-every must be >= 1, got {every}")
        self.every, self.outputs, self.rank_examples = every, list(outputs), rank_examples
        self.event_outputs = list(event_outputs or ())
        self.config = None
        self._reset()
        self._epoch = self._last_ex = None

    def _reset(self):
        self.n = self.correct = self.steps = 0
        self.loss = self.seconds = 0.0
        self.compute = self.examples = None

    def on_start(self, info):
        self.config = dict(info.config)

    def on_step(self, s):
        self.n += s.batch
        self.seconds += s.step_seconds
        self.loss += s.loss_sum
        self.correct += s.correct
        self.steps += 1
        if s.compute_seconds is not None:
            self.compute = s.compute_seconds.copy() if self.compute is None else self.compute + s.compute_seconds
        if self.rank_examples is not None:
            ex = np.asarray(self.rank_examples())
            new = ex if (self._epoch != s.epoch or self._last_ex is None) else ex - self._last_ex
            self.examples = new.copy() if self.examples is None else self.examples + new
            self._epoch, self._last_ex = s.epoch, ex.copy()
        if s.step % self.every == 0:
            self._emit(s)

    def _emit(self, s):
        seconds = max(self.seconds, 1e-9)
        row = {"event": "step", "step": s.step, "epoch": s.epoch + 1, "time": round(time.time(), 3),
               "steps": self.steps, "seconds": round(seconds, 4), "loss": self.loss / max(self.n, 1),
               "acc": self.correct / max(self.n, 1), "lr": float(s.lr), "images_per_s": round(self.n / seconds, 1)}
        if self.examples is not None and len(self.examples) > 1:
            row["rank_images_per_s"] = [round(float(v) / seconds, 1) for v in self.examples]
        if self.compute is not None and len(self.compute) > 1:
            row["rank_compute_s"] = [round(float(v), 4) for v in self.compute]
            row["rank_wait_s"] = [round(max(0.0, seconds - float(v)), 4) for v in self.compute]
        if self.config is not None:
            row["config"], self.config = self.config, None
        for out in self.outputs:
            out(row)
        self._reset()

    def on_epoch(self, record):
        pass

    def on_event(self, row):
        if row.get("event") in EVENTS and isinstance(row.get("step"), int):
            for out in self.event_outputs:
                out(row)

    def on_end(self, summary):
        pass

    def close(self):
        pass
