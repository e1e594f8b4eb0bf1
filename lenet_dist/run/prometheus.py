"""--metrics-port: rank 0 serves its own /metrics (Prometheus' text format, lenet_dist/exposition.py), and
/healthz and /readyz, from a sink (sinks.py), with the standard library's HTTP server on a daemon thread
(evaluation/health.py's, the evaluator's probes). Every series is labelled run and run_id, as the
evaluator's are, so the two join; per-rank series add rank. Base units: seconds, ratios.

    sink = PrometheusSink(("127.0.0.1", 9100), run_id, run_name, link)   # link: TrainerLink or None
    curl -s 127.0.0.1:9100/metrics

on_step only adds and compares; the figures are read at scrape time from what it keeps.
"""
from __future__ import annotations

import time

import numpy as np

from lenet_dist.evaluation.health import Health, HealthServer
from lenet_dist.exposition import Family, render
from lenet_dist.run.sinks import Sink

PREFIX = "lenet_trainer_"
WINDOW_S = 2.0              # loss, accuracy and images/s are over the steps of the last window this long


class PrometheusSink(Sink):
    """A sink whose figures a scrape reads (from the server's thread: plain attributes, set whole)."""

    def __init__(self, address, run_id, run_name, link=None):
        """address: (host, port), port 0 for a free one (.port); link: rank 0's TrainerLink (the evaluator
        lag), or None. An OSError when the port cannot be had (in use, no permission)."""
        self.labels = {"run": run_name or (run_id or "")[:8], "run_id": run_id or ""}
        self.link = link
        self.health = Health()
        self.started = time.time()
        self.step = self.epoch = self.examples = 0
        self.ranks = 1
        self.loss = self.accuracy = self.images_per_s = self.lr = None
        self.compute = self.wait = None                 # per-rank seconds, summed over this start
        self._n = self._correct = 0
        self._loss_sum = 0.0
        self._t0 = None
        self.server = HealthServer(self.health, *address, metrics=self.text)
        self.port, self.url = self.server.port, self.server.url

    def on_start(self, info):
        self.step, self.ranks = info.start_step, info.ranks
        self.health.ready()

    def on_step(self, s):
        self.health.beat()
        self.step, self.epoch, self.lr = s.step, s.epoch, s.lr
        self.examples += s.batch
        self._n += s.batch
        self._loss_sum += s.loss_sum
        self._correct += s.correct
        if s.compute_seconds is not None:               # [dist] who computed, who waited
            c = np.asarray(s.compute_seconds, np.float64)
            w = np.maximum(s.step_seconds - c, 0.0)
            if self.compute is None or len(self.compute) != len(c):
                self.compute, self.wait = c.copy(), w
            else:
                self.compute, self.wait = self.compute + c, self.wait + w    # new arrays: a scrape sees whole ones
        if self._t0 is None:
            self._t0 = s.time - s.step_seconds
        if s.time - self._t0 >= WINDOW_S:
            n, seconds = max(self._n, 1), s.time - self._t0
            self.loss, self.accuracy, self.images_per_s = self._loss_sum / n, self._correct / n, self._n / seconds
            self._n, self._correct, self._loss_sum, self._t0 = 0, 0, 0.0, s.time

    def on_end(self, summary):
        self.health.not_ready("finished" if summary.get("outcome") == "finished" else "stopping")

    def close(self):
        self.server.close()

    def _lag(self):
        """(steps, seconds) since the newest evaluation result the trainer received: (None, None) before one."""
        result = self.link.latest_result() if self.link is not None else None
        if not result:
            return None, None
        when = result.get("time")
        return max(self.step - int(result["step"]), 0), (max(time.time() - when, 0.0) if when else None)

    def text(self):
        """The exposition text of what the sink holds now."""
        lab = self.labels
        lag_steps, lag_seconds = self._lag()
        per_rank = [] if self.compute is None else list(enumerate(zip(self.compute.tolist(), self.wait.tolist())))
        families = [
            Family("steps_total", "counter", "training steps done in this run (resumed runs count from their "
                   "checkpoint's step)", [(lab, self.step)]),
            Family("examples_total", "counter", "training examples processed by this start of the run, all ranks",
                   [(lab, self.examples)]),
            Family("epoch", "gauge", "the epoch under way, counted from 0", [(lab, self.epoch)]),
            Family("loss", "gauge", "mean training cross-entropy over the last few seconds' steps", [(lab, self.loss)]),
            Family("accuracy_ratio", "gauge", "training accuracy over the last few seconds' steps",
                   [(lab, self.accuracy)]),
            Family("learning_rate", "gauge", "the learning rate the newest step used", [(lab, self.lr)]),
            Family("images_per_second", "gauge", "training images per second over the last few seconds, all ranks",
                   [(lab, self.images_per_s)]),
            Family("ranks", "gauge", "ranks training this run", [(lab, self.ranks)]),
            Family("compute_seconds_total", "counter", "seconds a rank spent computing its shard, this start",
                   [(dict(lab, rank=str(r)), c) for r, (c, _) in per_rank]),
            Family("wait_seconds_total", "counter", "seconds a rank spent waiting (the allreduce, the update, "
                   "the slower ranks), this start", [(dict(lab, rank=str(r)), w) for r, (_, w) in per_rank]),
            Family("evaluator_lag_steps", "gauge", "steps since the step of the newest evaluation result received",
                   [(lab, lag_steps)]),
            Family("evaluator_lag_seconds", "gauge", "seconds since the newest evaluation result received was made",
                   [(lab, lag_seconds)]),
            Family("start_time_seconds", "gauge", "Unix time this start of the trainer began", [(lab, self.started)]),
        ]
        for f in families:
            f.name = PREFIX + f.name
        return render(families)
