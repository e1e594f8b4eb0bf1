"""The evaluator's history, by run: every evaluation it made, read back at start from its --report file (the
JSONL it appends one result to per evaluation, each naming its run) and added to as it goes. So a restarted
evaluator knows every run it evaluated, and the results of two runs are never one series. The trainer's rows
that reach the evaluator (step rows, "lr" and "control" marks, the newest "timeline" window, each run's
configuration) are kept by run too, appended to a file beside the report (rows_path: eval.jsonl ->
eval.rows.jsonl, one {"run": key, ...row} a line) and read back with it, so a restarted evaluator still draws a
finished run's curves with no trainer behind it.

    history = History.load(Path("eval.jsonl"), warn=log.warning)
    history.add(result)                 # an Output of the loop
    history.add_rows(key, rows)         # the trainer's rows of run `key`: -> the ones not seen before
    history.runs()                      # [RunHistory], oldest first
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from lenet_dist import selection
from lenet_dist.files import NotRegularFile, open_regular
from lenet_dist.rowstore import RowStore

# What each evaluation keeps in memory (the report's per-class figures and confusion stay in the file).
KEPT = ("step", "epoch", "val_accuracy", "val_loss", "test_accuracy", "test_loss", "n_val", "n_test",
        "eval_seconds", "lag_steps", "trainer_step", "final", "time", "source", "evaluator")
UNNAMED = "unnamed"                     # the run of results written before results named their run
MAX_ROWS = 20_000                       # step rows kept per run (a 5-epoch run at --log-every 10 has ~430)
MARKS = ("lr", "control")               # rows drawn as marks on the step axis


def rows_path(report):
    """Where the rows of the runs in `report` are kept: eval.jsonl -> eval.rows.jsonl."""
    return None if report is None else Path(report).with_name(Path(report).stem + ".rows.jsonl")


def run_key(result):
    return result.get("run_id") or result.get("run") or UNNAMED


def summary(result):
    """The kept figures of one result; test_accuracy/test_loss also from a report's older names."""
    r = dict(result)
    r.setdefault("test_accuracy", r.get("accuracy"))
    r.setdefault("test_loss", r.get("loss"))
    return {k: r.get(k) for k in KEPT}


def take(run, row):
    """Keep one of the trainer's rows in `run` (steps, marks, timeline, config: a RunHistory, or the dashboard's
    copy of a run; its steps a RowStore) if it is new to it: True if it was. Step rows in step order, each once;
    a mark once per kind and step; the newest timeline window; the first configuration."""
    kind, step = row.get("event", "step"), row.get("step")
    if run.config is None and isinstance(row.get("config"), dict):
        run.config = row["config"]
    if kind == "step":
        if run.steps.last_step is not None and step <= run.steps.last_step:
            return False
        run.steps.append(row)
    elif kind in MARKS:
        if any(m.get("event") == kind and m.get("step") == step for m in run.marks):
            return False
        run.marks.append(row)
    elif kind == "timeline":
        if run.timeline is not None and run.timeline.get("step") == step:
            return False
        run.timeline = row
    elif kind != "config":
        return False
    return True


@dataclass
class RunHistory:
    run_id: str | None
    name: str
    evaluations: list = field(default_factory=list)     # summaries, oldest first
    count: int = 0                                      # evaluations made, a step scored again included
    eval_seconds_total: float = 0.0
    best: dict | None = None                            # by lenet_dist.selection (validation)
    steps: RowStore = field(default_factory=lambda: RowStore(MAX_ROWS))     # as compact JSON bytes
    marks: list = field(default_factory=list)           # "lr" and "control" rows, oldest first
    timeline: dict | None = None                        # the newest "timeline" row
    config: dict | None = None                          # the run's configuration (its first step row's)

    @property
    def key(self):
        return self.run_id or self.name

    def take(self, row):
        return take(self, row)

    @property
    def finished(self):
        return bool(self.evaluations) and bool(self.evaluations[-1]["final"])

    @property
    def last(self):
        return self.evaluations[-1] if self.evaluations else None

    def to_dict(self):
        last, best = self.last or {}, self.best or {}
        return {"key": self.key, "run_id": self.run_id, "name": self.name, "status": "finished" if self.finished else "running",
                "evaluations": len(self.evaluations), "last_step": last.get("step"), "last_time": last.get("time"),
                "best_step": best.get("step"), "best_val_accuracy": best.get("val_accuracy"),
                "best_test_accuracy": best.get("test_accuracy")}


class History:
    def __init__(self, rows_file=None, warn=None):
        self._runs = {}                 # run key -> RunHistory, in the order first seen
        self._lock = threading.Lock()   # the loop adds, the metrics thread reads
        self.loaded = 0                 # evaluations read back from the report at start
        self.rows_file, self._warn = rows_file, warn or (lambda message: None)

    @classmethod
    def load(cls, path, warn):
        """The history in `path` (an evaluator's --report); empty when there is none yet. Lines that are not
        a result (a torn last line, junk) are skipped and counted in one warning."""
        h = cls(rows_path(path), warn)
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
            return cls(rows_path(path), warn)
        if bad:
            warn(f"history: {bad} line(s) of {path} are not evaluation results: skipped")
        h._load_rows()
        return h

    def _load_rows(self):
        if not self.rows_file.exists():
            return
        bad = 0
        try:
            with open_regular(self.rows_file, "rb") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                        ok = isinstance(row, dict) and isinstance(row.get("step"), int) and isinstance(row.get("run"), str)
                    except ValueError:
                        ok = False
                    run = self._runs.get(row.pop("run")) if ok else None
                    if run is not None:
                        run.take(row)
                    else:
                        bad += 1 if line.strip() else 0
        except (OSError, NotRegularFile) as e:
            self._warn(f"history: cannot read {self.rows_file} ({getattr(e, 'strerror', None) or e}): "
                       f"the runs' curves start afresh")
        if bad:
            self._warn(f"history: {bad} line(s) of {self.rows_file} are not rows of a known run: skipped")

    def add_rows(self, key, rows):
        """The trainer's rows of run `key` (step rows, marks, timeline windows, a configuration): -> those not
        seen before, kept and appended to rows_file. Rows of a run with no evaluation yet are not kept."""
        with self._lock:
            run = self._runs.get(key)
            new = [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), int)
                   and run is not None and run.take(r)]
        if new and self.rows_file is not None:
            try:
                with open(self.rows_file, "a", encoding="utf-8") as f:
                    f.writelines(json.dumps({"run": key, **r}, allow_nan=False) + "\n" for r in new)
            except (OSError, ValueError) as e:      # an output, not the evaluation: say so once, go on
                self._warn(f"history: rows not kept in {self.rows_file}: {getattr(e, 'strerror', None) or e}")
                self.rows_file = None
        return new

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
