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
from lenet_dist.nn.model import LeNet5

MAX_STEPS = 20_000          # telemetry rows kept (a 5-epoch MNIST run at the default --log-every has ~470)
MAX_EVALUATIONS = 5_000
MAX_EVENTS = 500             # replayed to a client that reconnects (Last-Event-ID): a few minutes of a run


def _pixels(u8):
    """uint8 (28,28) -> base64 of its 784 bytes, row by row (the page draws it into an ImageData)."""
    return base64.b64encode(np.ascontiguousarray(u8, np.uint8).tobytes()).decode()


class LiveState:
    def __init__(self, test_images, test_labels):
        self.test_images, self.test_labels = test_images, test_labels
        self._lock = threading.Lock()
        self._steps = collections.deque(maxlen=MAX_STEPS)
        self._evaluations = collections.deque(maxlen=MAX_EVALUATIONS)
        self._events = collections.deque(maxlen=MAX_EVENTS)
        self._seq = 0
        self._config = None
        self._checkpoint = None                 # the newest checkpoint's analysis, JSON-ready
        self._models = {}                       # "newest" / "best" -> (LeNet5, step, accuracy)
        self._model_lock = threading.Lock()     # one forward pass at a time per state (shared scratch)
        self._best = None                       # the best evaluation's summary, by lenet_dist.selection
        self._run = None                        # the run shown: {"run_id", "name", ...}; None before one is named
        self._runs = []                         # every run the evaluator knows (history.RunHistory.to_dict())
        self.listeners = []                     # callables, called with no argument after every change
        self.started = time.time()

    # ------------------------------------------------------------------------------------------ writers
    def add_steps(self, rows):
        """Telemetry rows from the trainer ("event": "step" dicts); ones already seen are skipped."""
        with self._lock:
            last = self._steps[-1]["step"] if self._steps else -1
            new = [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), int) and r["step"] > last]
            if not new:
                return
            self._steps.extend(new)
            if self._config is None and new[-1].get("config"):
                self._config = new[-1]["config"]
            self._event("steps", new)
        self._notify()

    def restore_evaluations(self, results):
        """The evaluations a restarted dashboard had shown (result dicts, oldest first), without their models:
        the history; the best and the newest follow as add_evaluation(..., replayed=True)."""
        with self._lock:
            self._evaluations.extend(dict(self._summary(r), per_class=None) for r in results)
            self._event("reload", {})
        self._notify()

    def start_run(self, run, results=(), keep_steps=False):
        """Show another run: its own series only (never two runs as one), from `results` (its history, oldest
        first); the pages reload. The models go too: drawing waits for the run's first evaluation. keep_steps:
        the step rows so far are this run's (no run was shown before)."""
        with self._model_lock:
            self._models, self._best = {}, None
        with self._lock:
            if not keep_steps:
                self._steps.clear()
            self._evaluations.clear()
            self._config = self._checkpoint = None
            self._run = run
            self._evaluations.extend(dict(self._summary(r), per_class=None) for r in results)
            for r in results:
                if selection.is_better(r, self._best):
                    self._best = self._summary(r)
            # the first run shown (keep_steps) only names what the pages show already; another one replaces it
            self._event("run", run) if keep_steps else self._event("reload", {})
        self._notify()

    def set_runs(self, runs):
        """The list of every run the evaluator knows, as history.RunHistory.to_dict() gives them."""
        with self._lock:
            self._runs = list(runs)
            self._event("runs", self._runs)
        self._notify()

    @staticmethod
    def _summary(result):
        # test_accuracy/test_loss, with accuracy/loss as their aliases (the page and older clients read those)
        test = {"test_accuracy": result.get("test_accuracy", result.get("accuracy")),
                "test_loss": result.get("test_loss", result.get("loss"))}
        return {**{k: result.get(k) for k in ("step", "epoch", "val_accuracy", "val_loss", "n_val", "eval_seconds",
                                             "lag_steps", "trainer_step", "n_test", "final", "time")},
                **test, "accuracy": test["test_accuracy"], "loss": test["test_loss"]}

    def add_evaluation(self, result, params, result_analysis, config=None, replayed=False):
        """One evaluated checkpoint: the evaluator's result dict, its named parameters, its Analysis.
        replayed: it is in the history already (restore_evaluations); only its model and analysis are new."""
        newest = self._load(params)
        p = newest.named_params()
        summary = self._summary(result)
        worst = [dict(w, pixels=_pixels(self.test_images[w["index"]])) for w in result_analysis.worst]
        ckpt = {**summary, **result_analysis.to_dict(), "worst": worst,
                "conv1_filters": np.asarray(p["conv1.weight"])[:, 0].round(5).tolist()}
        with self._model_lock:
            self._models["newest"] = (newest, summary["step"], summary["accuracy"])
            # the best so far, or the model of the best the history named already (a restart's restore)
            if selection.is_better(summary, self._best) or (self._best or {}).get("step") == summary["step"]:
                self._best = summary
                self._models["best"] = self._models["newest"]
        with self._lock:
            if config is not None:
                self._config = config
            entry = dict(summary, per_class=ckpt["per_class"])
            if replayed:
                for i, e in enumerate(self._evaluations):
                    if e["step"] == summary["step"]:
                        self._evaluations[i] = entry
            else:
                self._evaluations.append(entry)
            self._checkpoint = ckpt
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

    def summary(self):
        with self._lock:
            last = self._evaluations[-1] if self._evaluations else None
            step = self._steps[-1] if self._steps else None
            return {"config": self._config, "seq": self._seq, "started": self.started, "run": self._run,
                    "trainer_step": max(step["step"] if step else -1,
                                        (last or {}).get("trainer_step") or -1, (last or {}).get("step", -1)),
                    "latest_evaluation": last, "latest_step": step, "evaluations": len(self._evaluations),
                    # best_accuracy: the test accuracy of the model chosen on validation (best), not the top one
                    "best": self._best, "best_accuracy": self._best["accuracy"] if self._best else None,
                    "n_test": len(self.test_images)}

    def history(self):
        with self._lock:
            return {"steps": list(self._steps), "evaluations": list(self._evaluations), "seq": self._seq}

    def runs(self):
        with self._lock:
            return {"runs": list(self._runs), "shown": self._run}

    def checkpoint(self):
        with self._lock:
            return self._checkpoint

    def test_digit(self, index):
        if not 0 <= index < len(self.test_images):
            raise ValueError(f"test image index {index} out of range [0, {len(self.test_images)})")
        return self.test_images[index], int(self.test_labels[index])

    def classify(self, u8, which="newest"):
        """Probabilities, the prediction and the conv feature maps of one uint8 digit (28,28) by the newest
        or the best checkpoint; None before any checkpoint was evaluated."""
        with self._model_lock:
            got = self._models.get(which)
            if got is None:
                return None
            model, step, accuracy = got
            probs, maps = analysis.look(model, u8)
        return {"model": which, "step": step, "accuracy": accuracy, "input": _pixels(u8),
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
