"""The evaluator's history, by run: every evaluation it made, read back at start from its --report file (the
JSONL it appends one result to per evaluation, each naming its run) and added to as it goes. So a restarted
evaluator knows every run it evaluated, and the results of two runs are never one series.

    history = History.load(Path("eval.jsonl"), warn=log.warning)
    history.add(result)                 # an Output of the loop
    history.runs()                      # [RunHistory], oldest first
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field

from lenet_dist import selection
from lenet_dist.files import NotRegularFile, open_regular

# What each evaluation keeps in memory (the report's per-class figures and confusion stay in the file).
KEPT = ("step", "epoch", "val_accuracy", "val_loss", "test_accuracy", "test_loss", "n_val", "n_test",
        "eval_seconds", "lag_steps", "trainer_step", "final", "time", "source")
UNNAMED = "unnamed"                     # the run of results written before results named their run


def run_key(result):
    return result.get("run_id") or result.get("run") or UNNAMED


def summary(result):
    """The kept figures of one result; test_accuracy/test_loss also from a report's older names."""
    r = dict(result)
    r.setdefault("test_accuracy", r.get("accuracy"))
    r.setdefault("test_loss", r.get("loss"))
    return {k: r.get(k) for k in KEPT}


@dataclass
class RunHistory:
    run_id: str | None
    name: str
    evaluations: list = field(default_factory=list)     # summaries, oldest first
    count: int = 0                                      # evaluations made, a step scored again included
    eval_seconds_total: float = 0.0
    best: dict | None = None                            # by lenet_dist.selection (validation)

    @property
    def finished(self):
        return bool(self.evaluations) and bool(self.evaluations[-1]["final"])

    @property
    def last(self):
        return self.evaluations[-1] if self.evaluations else None

    def to_dict(self):
        last, best = self.last or {}, self.best or {}
        return {"run_id": self.run_id, "name": self.name, "status": "finished" if self.finished else "running",
                "evaluations": len(self.evaluations), "last_step": last.get("step"), "last_time": last.get("time"),
                "best_step": best.get("step"), "best_val_accuracy": best.get("val_accuracy"),
                "best_test_accuracy": best.get("test_accuracy")}


class History:
    def __init__(self):
        self._runs = {}                 # run key -> RunHistory, in the order first seen
        self._lock = threading.Lock()   # the loop adds, the metrics thread reads
        self.loaded = 0                 # evaluations read back from the report at start

    @classmethod
    def load(cls, path, warn):
        """The history in `path` (an evaluator's --report); empty when there is none yet. Lines that are not
        a result (a torn last line, junk) are skipped and counted in one warning."""
        h = cls()
        if path is None or not path.exists():
            return h
        bad = 0
        try:
            with open_regular(path, "rb") as f:
                for line in f:
                    try:
                        result = json.loads(line)
                        ok = isinstance(result, dict) and isinstance(result.get("step"), int)
                    except ValueError:
                        ok = False
                    if ok:
                        h.add(result)
                        h.loaded += 1
                    else:
                        bad += 1 if line.strip() else 0
        except (OSError, NotRegularFile) as e:
            warn(f"history: cannot read {path} ({getattr(e, 'strerror', None) or e}): starting without it")
            return cls()
        if bad:
            warn(f"history: {bad} line(s) of {path} are not evaluation results: skipped")
        return h

    def add(self, result):
        key = run_key(result)
        s = summary(result)
        with self._lock:
            run = self._runs.get(key)
            if run is None:
                run = self._runs[key] = RunHistory(result.get("run_id"), result.get("run") or key[:8] or UNNAMED)
            run.count += 1
            if run.evaluations and run.evaluations[-1]["step"] == s["step"]:
                run.evaluations[-1] = s     # a restarted evaluator scored the newest checkpoint again
            else:
                run.evaluations.append(s)
            run.eval_seconds_total += float(s["eval_seconds"] or 0.0)
            if selection.is_better(s, run.best):
                run.best = s

    def runs(self):
        with self._lock:
            return list(self._runs.values())

    def run(self, key):
        with self._lock:
            return self._runs.get(key)
