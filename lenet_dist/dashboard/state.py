"""What the dashboard shows, kept by the evaluator as it goes: a thread-safe, bounded store.

Writers (the evaluator's loop, its telemetry thread) call add_steps / add_evaluation; readers (the web
app, on its own thread) call the getters, which return plain JSON-ready values. Every change is also an
event (seq, kind, JSON text) in a bounded log that the live stream replays from a client's last seq;
listeners (the web app) are told "something changed" and must not block.
"""
from __future__ import annotations

import base64
import collections
import json
import threading
import time

import numpy as np

from lenet_dist import selection
from lenet_dist.evaluation import analysis
from lenet_dist.evaluation import history
from lenet_dist.evaluation.history import UNNAMED
from lenet_dist.nn.model import LeNet5
from lenet_dist.rowstore import RowStore

MAX_STEPS = 20_000          # telemetry rows kept (a 5-epoch MNIST run at the default --log-every has ~470)
MAX_EVALUATIONS = 5_000
MAX_EVENTS = 500             # replayed to a client that reconnects (Last-Event-ID): a few minutes of a run
MAX_MARKS = 1_000            # "lr" and "control" rows kept per run
MAX_RUNS = 50                # runs kept with their series and models (~0.5 MB of models each)


def _no_series():
    """What /api/history gives, but the step rows, before any run is known."""
    return {"evaluations": [], "marks": [], "timeline": None, "config": None, "run": None, "has_checkpoint": False}


def _pixels(u8):
    """uint8 (28,28) -> base64 of its 784 bytes, row by row (the page draws it into an ImageData)."""
    return base64.b64encode(np.ascontiguousarray(u8, np.uint8).tobytes()).decode()


class _Run:
    """One run's series, as the page draws them."""

    def __init__(self, key, info):
        self.key = key
        self.info = info                        # {"key", "run_id", "name", ...} (history.RunHistory.to_dict())
        self.steps = RowStore(MAX_STEPS)          # as compact JSON bytes: MAX_RUNS runs of them add up
        self.evaluations = collections.deque(maxlen=MAX_EVALUATIONS)
        self.marks = collections.deque(maxlen=MAX_MARKS)
        self.timeline = None                    # the newest "timeline" row
        self.config = None
        self.checkpoint = None                  # the newest checkpoint's analysis, JSON-ready
        self.models = {}                        # "newest" / "best" -> (LeNet5, step, accuracy)
        self.best = None                        # the best evaluation's summary, by lenet_dist.selection
        self.named = False                      # the evaluator named it (start_run): /api/state says which

    def take(self, row):
        return history.take(self, row)

    def series(self, steps=True):
        """What /api/history gives of this run; steps=False: all but the step rows."""
        out = {"run": self.info, "evaluations": list(self.evaluations), "marks": list(self.marks),
               "timeline": self.timeline, "config": self.config, "has_checkpoint": self.checkpoint is not None}
        return dict(out, steps=list(self.steps)) if steps else out


class LiveState:
    """Every run the evaluator sends, kept apart by run key (history.run_key); one of them is shown (the page
    focuses it first, and the getters answer for it unless asked for another run)."""

    def __init__(self, test_images, test_labels):
        self.test_images, self.test_labels = test_images, test_labels
        self._lock = threading.Lock()
        self._events = collections.deque(maxlen=MAX_EVENTS)
        self._seq = 0
        self._by_key = collections.OrderedDict()   # run key -> _Run, the least recently fed first
        self._shown = None                      # the shown run's key
        self._became = {}                       # UNNAMED -> the named run its rows turned out to be
        self._model_lock = threading.Lock()     # one forward pass at a time per state (shared scratch)
        self._runs = []                         # every run the evaluator knows (history.RunHistory.to_dict())
        self.listeners = []                     # callables, called with no argument after every change
        self.started = time.time()

    # ------------------------------------------------------------------------------------------ runs
    def _key(self, obj):
        """A row's or a result's run key; an unnamed one belongs to the shown run (one run, no names)."""
        return obj.get("run_id") or obj.get("run") or self._shown or UNNAMED     # a row's "run" is its key

    def _get(self, key, info=None):
        """The run of `key`, made (and the oldest dropped past MAX_RUNS) when new; the caller holds the lock."""
        run = self._by_key.get(key)
        if run is None:
            run = self._by_key[key] = _Run(key, info or {"key": key, "run_id": None, "name": key[:8]})
            while len(self._by_key) > MAX_RUNS:
                old = next(k for k in self._by_key if k != self._shown)
                del self._by_key[old]
        self._by_key.move_to_end(key)
        if self._shown is None:
            self._shown = key
        return run

    # ------------------------------------------------------------------------------------------ writers
    def add_steps(self, rows):
        """The trainer's rows ("event": "step", "lr", "control", "timeline"), each naming its run ("run": key;
        none: the shown run's); ones already seen are skipped."""
        with self._lock:
            new = []
            for r in rows:
                if isinstance(r, dict) and isinstance(r.get("step"), int):
                    r = dict(r, run=self._key(r))
                    if self._get(r["run"]).take(r):
                        new.append(r)
            if not new:
                return
            self._event("steps", new)
        self._notify()

    def restore_evaluations(self, results):
        """The evaluations a restarted dashboard had shown (result dicts, oldest first), without their models:
        the history; the best and the newest follow as add_evaluation(..., replayed=True)."""
        with self._lock:
            for r in results:
                self._get(self._key(r)).evaluations.append(dict(self._summary(r), per_class=None))
            self._event("reload", {})
        self._notify()

    def start_run(self, run, results=(), keep_steps=True):
        """Show `run` (history.RunHistory.to_dict()) first; `results`: its evaluations so far (oldest first),
        taken when the state has none of this run yet. The other runs stay (the page may overlay them)."""
        key = run.get("key") or run.get("run_id") or run.get("name") or UNNAMED
        with self._lock:
            r = self._get(key, run)
            r.info, r.named = run, True
            if not r.evaluations:
                r.evaluations.extend(dict(self._summary(x), per_class=None) for x in results)
                with self._model_lock:
                    for x in results:
                        if selection.is_better(x, r.best):
                            r.best = self._summary(x)
            self._shown = key
            stray = self._by_key.get(UNNAMED)       # rows shown before any run was named: that run's now
            if key != UNNAMED and stray is not None and not stray.named:
                del self._by_key[UNNAMED]
                self._became[UNNAMED] = key         # a page that asks for it (it saw it shown) gets that run
            self._event("run", run)
        self._notify()

    def set_runs(self, runs):
        """The list of every run the evaluator knows, as history.RunHistory.to_dict() gives them."""
        with self._lock:
            self._runs = list(runs)
            for info in self._runs:
                if info.get("key") in self._by_key:
                    self._by_key[info["key"]].info = info
            self._event("runs", self._runs)
        self._notify()

    @staticmethod
    def _summary(result):
        # test_accuracy/test_loss, with accuracy/loss as their aliases (the page and older clients read those)
        test = {"test_accuracy": result.get("test_accuracy", result.get("accuracy")),
                "test_loss": result.get("test_loss", result.get("loss"))}
        return {**{k: result.get(k) for k in ("step", "epoch", "val_accuracy", "val_loss", "n_val", "eval_seconds",
                                             "lag_steps", "trainer_step", "n_test", "final", "time", "evaluator")},
                **test, "accuracy": test["test_accuracy"], "loss": test["test_loss"]}

    def add_evaluation(self, result, params, result_analysis, config=None, replayed=False):
        """One evaluated checkpoint: the evaluator's result dict, its named parameters, its Analysis.
        replayed: it is in the history already (restore_evaluations); only its model and analysis are new."""
        newest = self._load(params)
        p = newest.named_params()
        summary = self._summary(result)
        worst = [dict(w, pixels=_pixels(self.test_images[w["index"]])) for w in result_analysis.worst]
        with self._lock:
            key = self._key(result)
            run = self._get(key)
        summary["run"] = key
        ckpt = {**summary, **result_analysis.to_dict(), "worst": worst,
                "conv1_filters": np.asarray(p["conv1.weight"])[:, 0].round(5).tolist()}
        with self._model_lock:
            run.models["newest"] = (newest, summary["step"], summary["accuracy"])
            # the best so far, or the model of the best the history named already (a restart's restore)
            if selection.is_better(summary, run.best) or (run.best or {}).get("step") == summary["step"]:
                run.best = summary
                run.models["best"] = run.models["newest"]
        with self._lock:
            if config is not None:                  # the checkpoint's own
                run.config = config
            entry = dict(summary, per_class=ckpt["per_class"])
            if replayed:
                for i, e in enumerate(run.evaluations):
                    if e["step"] == summary["step"]:
                        run.evaluations[i] = entry
            else:
                run.evaluations.append(entry)
            run.checkpoint = ckpt
            self._event("evaluation", entry)
            self._event("checkpoint", ckpt)
        self._notify()

    @staticmethod
    def _load(params):
        m = LeNet5()
        m.load_named(params)
        return m

    def _event(self, kind, data):
        self._seq += 1
        self._events.append((self._seq, kind, json.dumps(data, allow_nan=False, default=_jsonable)))

    def _notify(self):
        for listener in list(self.listeners):
            listener()

    # ------------------------------------------------------------------------------------------ readers
    def events_since(self, seq):
        """[(seq, kind, json text)] after `seq`, oldest first (as many as the bounded log still holds)."""
        with self._lock:
            n = min(self._seq - seq, len(self._events))     # seqs are consecutive: the last n are newer
            return [self._events[i] for i in range(len(self._events) - n, len(self._events))] if n > 0 else []

    @property
    def seq(self):
        with self._lock:
            return self._seq

    def _run(self, key=None):
        """The run of `key` (None: the shown one; the unnamed run once named: the run it became); KeyError
        naming it when there is no such run."""
        key = key if key is not None else self._shown
        run = self._by_key.get(key)
        if run is None and key in self._became:
            run = self._by_key.get(self._became[key])
        if run is None and key is not None:
            raise KeyError(f"no run {key!r} on this dashboard")
        return run

    def summary(self, key=None):
        with self._lock:
            run = self._run(key)
            last = run.evaluations[-1] if run and run.evaluations else None
            step = run.steps[-1] if run and run.steps else None
            best = run.best if run else None
            return {"key": run and run.key, "config": run and run.config, "seq": self._seq, "started": self.started,
                    "run": run.info if run and run.named else None,
                    "trainer_step": max(step["step"] if step else -1,
                                        (last or {}).get("trainer_step") or -1, (last or {}).get("step", -1)),
                    "latest_evaluation": last, "latest_step": step, "evaluations": len(run.evaluations) if run else 0,
                    # best_accuracy: the test accuracy of the model chosen on validation (best), not the top one
                    "best": best, "best_accuracy": best["accuracy"] if best else None,
                    "n_test": len(self.test_images)}

    def history(self, key=None):
        with self._lock:
            run = self._run(key)
            if run is None:
                return dict(_no_series(), steps=[], seq=self._seq)
            return dict(run.series(), seq=self._seq)

    def history_json(self, key=None):
        """history() as JSON bytes, the step rows spliced in as the bytes they are kept as (never decoded)."""
        with self._lock:
            run = self._run(key)
            rest = dict(run.series(steps=False) if run is not None else _no_series(), seq=self._seq)
            steps = run.steps.json_array() if run is not None else b"[]"
        head = json.dumps(rest, allow_nan=False, default=_jsonable, separators=(",", ":")).encode()
        return head[:-1] + b',"steps":' + steps + b"}"

    def runs(self):
        with self._lock:
            shown = self._by_key.get(self._shown)
            return {"runs": list(self._runs), "shown": shown.info if shown else None, "shown_key": self._shown}

    def checkpoint(self, key=None):
        with self._lock:
            run = self._run(key)
            return run and run.checkpoint

    def test_digit(self, index):
        if not 0 <= index < len(self.test_images):
            raise ValueError(f"test image index {index} out of range [0, {len(self.test_images)})")
        return self.test_images[index], int(self.test_labels[index])

    def classify(self, u8, which="newest", key=None):
        """Probabilities, the prediction and the conv feature maps of one uint8 digit (28,28) by the newest
        or the best checkpoint of run `key` (None: the shown run); None before any checkpoint of it was
        evaluated; KeyError for a run the dashboard does not know."""
        with self._lock:
            run = self._run(key)
        with self._model_lock:
            got = run.models.get(which) if run else None
            if got is None:
                return None
            model, step, accuracy = got
            probs, maps = analysis.look(model, u8)
        return {"model": which, "step": step, "accuracy": accuracy, "input": _pixels(u8),
                "run": run.info.get("key") or run.info.get("name"),
                "probabilities": [round(float(v), 6) for v in probs], "predicted": int(probs.argmax()),
                "conv1": _maps(maps["conv1"]), "conv2": _maps(maps["conv2"])}


def _maps(a):
    """Feature maps (C,H,W) -> each scaled to 0..255 by its own maximum, as base64 bytes (page draws them)."""
    top = a.reshape(len(a), -1).max(axis=1)
    scaled = a / np.where(top > 0, top, 1.0)[:, None, None] * 255.0
    return {"shape": list(a.shape), "pixels": _pixels(np.rint(scaled).astype(np.uint8).reshape(len(a), -1))}


def _jsonable(v):
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"{type(v).__name__} is not JSON")
