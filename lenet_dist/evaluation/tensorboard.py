"""--tensorboard DIR: TensorBoard event files by tensorboardX (the `tensorboard` extra; no TensorFlow).

The trainer (rank 0) writes DIR/trainer and the evaluator DIR/evaluator, so `tensorboard --logdir DIR`
shows one run's two sides next to each other:
    trainer    train/loss, train/accuracy, train/learning_rate, train/images_per_s (every --log-every
               steps), epoch/* (the epoch record's figures), weights/* and gradients/* histograms and the
               conv1 filters as an image, once per epoch
    evaluator  eval/val_accuracy, eval/val_loss, eval/test_accuracy, eval/test_loss, eval/lag_steps,
               eval/seconds, eval/class_accuracy/0..9 (under evaluator/RUN for a run with a name), and
               the confusion matrix as an image, per evaluated checkpoint
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lenet_dist.nn.model import PARAM_SPECS


def _writer(directory):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise RuntimeError("--tensorboard needs tensorboardX: pip install 'lenet-dist[tensorboard]'") from None
    Path(directory).mkdir(parents=True, exist_ok=True)
    return SummaryWriter(logdir=str(directory), flush_secs=5)


def confusion_image(confusion, cell=16):
    """(10,10) counts -> (3, 10*cell, 10*cell) uint8: each row scaled by its total, white (none) to blue
    (all of the row) on the diagonal and to red off it."""
    c = np.asarray(confusion, np.float64)
    share = c / np.maximum(c.sum(axis=1, keepdims=True), 1)
    diag = np.eye(len(c), dtype=bool)
    strength = np.where(diag, share, np.minimum(1.0, 4 * share))
    blue, red = np.array([42, 111, 219]), np.array([224, 101, 58])
    colour = np.where(diag[..., None], blue, red)
    rgb = 255 - strength[..., None] * (255 - colour)                    # (10,10,3)
    big = np.kron(rgb, np.ones((cell, cell, 1)))
    big[::cell, :, :] = big[:, ::cell, :] = 200                          # grid lines
    return np.clip(big, 0, 255).astype(np.uint8).transpose(2, 0, 1)


def filters_image(weight, scale=8, gap=2):
    """conv1 weights (6,1,5,5) -> (1, 5*scale, 6*(5*scale+gap)) in [0, 1]: grey 0.5 is zero, each filter
    scaled by the largest magnitude among them all."""
    w = np.asarray(weight, np.float64)[:, 0]
    w = 0.5 + 0.5 * w / max(np.abs(w).max(), 1e-12)
    tiles = [np.pad(np.kron(f, np.ones((scale, scale))), ((0, 0), (0, gap)), constant_values=1.0) for f in w]
    return np.concatenate(tiles, axis=1)[None]


class EvaluatorBoard:
    """Event files under DIR/evaluator, one folder per run the result names (DIR/evaluator/RUN), so that
    TensorBoard lists the runs an evaluator served side by side and never draws two as one line."""

    def __init__(self, directory):
        self.dir = Path(directory) / "evaluator"
        self._writers = {}                          # run name (None: unnamed) -> writer

    def _for(self, run):
        if run not in self._writers:
            safe = run if run and run not in (".", "..") and "/" not in run and "\\" not in run else None
            self._writers[run] = _writer(self.dir / safe if safe else self.dir)
        return self._writers[run]

    def add_evaluation(self, result, detail):
        step, w = result["step"], self._for(result.get("run"))
        for tag, key in (("eval/val_accuracy", "val_accuracy"), ("eval/val_loss", "val_loss"),
                         ("eval/test_accuracy", "test_accuracy"), ("eval/test_loss", "test_loss"),
                         ("eval/lag_steps", "lag_steps"), ("eval/seconds", "eval_seconds")):
            if result.get(key) is not None:
                w.add_scalar(tag, result[key], step)
        for k, acc in enumerate(detail.per_class):
            if acc is not None:
                w.add_scalar(f"eval/class_accuracy/{k}", acc, step)
        w.add_image("eval/confusion", confusion_image(detail.confusion), step)

    def close(self):
        for w in self._writers.values():
            w.close()


class TrainerBoard:
    """Rank 0's sink: step rows come from the telemetry window (add_row), the rest from on_epoch."""

    def __init__(self, directory, model):
        self.w = _writer(Path(directory) / "trainer")
        self.model = model

    def on_start(self, info):
        self.w.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in info.config.items()), info.start_step)

    def add_row(self, row):
        step = row["step"]
        for tag, key in (("train/loss", "loss"), ("train/accuracy", "acc"), ("train/learning_rate", "lr"),
                         ("train/images_per_s", "images_per_s")):
            if row.get(key) is not None:
                self.w.add_scalar(tag, row[key], step)
        for k, v in enumerate(row.get("rank_images_per_s") or []):
            self.w.add_scalar(f"train/rank_images_per_s/{k}", v, step)

    def on_step(self, s):
        pass

    def on_epoch(self, record):
        step = record["step"]
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "images_per_s", "lr", "seconds"):
            if isinstance(record.get(key), (int, float)):
                self.w.add_scalar(f"epoch/{key}", record[key], step)
        off, grads = 0, self.model.grads
        params = self.model.named_params()
        for name, shape in PARAM_SPECS:
            n = int(np.prod(shape))
            self.w.add_histogram(f"weights/{name}", np.asarray(params[name], np.float64).ravel(), step)
            self.w.add_histogram(f"gradients/{name}", np.asarray(grads[off:off + n], np.float64), step)
            off += n
        self.w.add_image("conv1/filters", filters_image(params["conv1.weight"]), step)
        self.w.flush()

    def on_end(self, summary):
        self.w.flush()

    def close(self):
        self.w.close()
