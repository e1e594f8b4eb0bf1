"""What lenet-evaluator holds and how it scores one checkpoint: only on the data the checkpoint was trained
for (lenet_dist/data/identity.py), on the validation split its meta describes (rebuilt from the training set) and on
the test set. Model selection (--best-dir) looks at the validation figures only."""
from __future__ import annotations

import math
import time

from lenet_dist.data.identity import data_mismatch
from lenet_dist.data.split import rebuild_validation
from lenet_dist.evaluation import analysis


class DataRefused(Exception):
    """The checkpoint was trained on other data than this evaluator holds; the message is one line."""


def _finite(x):
    return x if math.isfinite(x) else None          # JSON has no inf


class Judge:
    def __init__(self, dataset):
        self.ds, self.identity = dataset, dataset.identity()
        self._split, self._val = None, None         # the last split rebuilt: the same for a whole run

    def validation(self, meta):
        """(images, labels) of the checkpoint's validation split, or None when it has none."""
        record = meta.get("data")
        split = (record or {}).get("split")
        if split != self._split:
            try:
                idx = rebuild_validation(record, len(self.ds.train_images))
            except ValueError as e:
                raise DataRefused(f"cannot rebuild the checkpoint's validation split: {e}") from None
            self._split = split
            self._val = None if idx is None else (self.ds.train_images[idx], self.ds.train_labels[idx])
        return self._val

    def score(self, model, ckpt, name):
        """(figures, analysis of the test set) of `ckpt`, its params already in `model`: test accuracy and
        loss, and validation ones when it has a split; raises DataRefused for a checkpoint of other data."""
        why = data_mismatch(ckpt.meta.get("data"), self.identity)
        if why:
            raise DataRefused(f"{name} was trained on other data: {why}; start the evaluator with the "
                              f"trainer's --dataset and --data-dir (or --subset)")
        val = self.validation(ckpt.meta)
        t0 = time.perf_counter()
        figures = {}
        if val is not None:
            loss, accuracy = model.evaluate(*val)
            figures.update(val_accuracy=accuracy, val_loss=_finite(loss), n_val=len(val[0]))
        detail = analysis.analyse(model, self.ds.test_images, self.ds.test_labels)   # as model.evaluate, and more
        figures.update(test_accuracy=detail.accuracy, test_loss=_finite(detail.loss), n_test=len(self.ds.test_images))
        figures["eval_seconds"] = round(time.perf_counter() - t0, 4)
        return figures, detail
