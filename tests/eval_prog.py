"""Run under `mpirun -n N python -m tests.eval_prog OUT.json` (or without mpirun): the trainer's distributed
evaluation (each rank a shard, figures summed) of 101 test images and 37 validation images (uneven shards
on 2, 3 and 4 ranks), labelled with what the untrained model predicts for them, with a clear margin. Every
example is then classified right, so the summed accuracy is exactly 1 if and only if every example was
counted exactly once. Rank 0 writes {split: [mean loss, accuracy]}."""
import json
import sys

import numpy as np

from lenet_dist.comm import get_comm
from lenet_dist.config import TrainConfig
from lenet_dist.data import load_subset, normalize
from lenet_dist.parallel.step import DataParallelTrainer

MARGIN = 1e-3           # top logit ahead of the second by this much: no batch size flips the prediction


def predicted(model, images, n):
    """The first n of `images` whose prediction has a clear margin, and those predictions."""
    logits = model.forward(normalize(images, out=np.empty(images.shape, np.float32)))       # (10, N)
    top2 = np.sort(logits, axis=0)[-2:]
    keep = np.flatnonzero(top2[1] - top2[0] > MARGIN)[:n]
    assert len(keep) == n, f"only {len(keep)} images with a clear margin"
    return images[keep], logits.argmax(axis=0)[keep].astype(np.uint8)


def main():
    comm = get_comm()
    ds = load_subset()
    t = DataParallelTrainer(TrainConfig(seed=3, val_size=0), comm, ds)
    t.test_images, t.test_labels = predicted(t.model, ds.test_images, 101)
    t.val_images, t.val_labels = predicted(t.model, ds.train_images[:500], 37)
    out = {split: t.evaluate(split) for split in ("test", "val")}
    if comm.rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
