"""The single-process speed benches: they time the trainer's own step, and the per-layer table covers it."""
import subprocess
import sys
from types import SimpleNamespace

import numpy as np

from bench.timing import Batches, recipe
from lenet_dist.comm import LocalComm
from lenet_dist.config import TrainConfig
from lenet_dist.data import load_subset
from lenet_dist.parallel.step import DataParallelTrainer

from tests.mpiutil import REPO, env


def test_bench_batches_are_the_trainers_batches_shifts_included():
    # bench_train.py and torch_compare.py time what the trainer feeds its model: the same images, shifted
    # the same way at each position of an epoch (random shifts on), normalized the same way.
    cfg = TrainConfig(batch_size=32, augment_shift=2, val_size=0)
    trainer = DataParallelTrainer(cfg, LocalComm(), load_subset())
    batches = Batches(SimpleNamespace(train_images=trainer.images, train_labels=trainer.labels), cfg, 32)
    for _ in range(3):
        idx = trainer._batch_indices()
        x_t, y_t = trainer._examples(idx, 0, len(idx))
        x_b, y_b = batches(idx)
        np.testing.assert_array_equal(x_b, x_t)
        np.testing.assert_array_equal(y_b, y_t)
        trainer.pos += 1


def test_bench_recipe_is_the_default_training_configuration():
    assert recipe() == TrainConfig()


def test_layer_table_names_every_layer_both_ways_and_the_step():
    p = subprocess.run([sys.executable, "bench/step_phases.py", "--layers", "--batch", "16", "--steps", "3",
                        "--warmup", "1"], capture_output=True, text=True, timeout=180, cwd=REPO,
                       env=env(LENET_DATA_DIR=""))
    assert p.returncode == 0, p.stderr
    rows = {tuple(c.strip() for c in line.split("|")[1:3]) for line in p.stdout.splitlines() if line.startswith("| ")}
    for layer in ("conv1", "pool1+relu", "conv2", "pool2+relu", "fc1", "fc2", "fc3", "loss"):
        assert (layer, "fwd") in rows and (layer, "bwd") in rows, (layer, p.stdout)
    assert ("batch", "data") in rows and ("update", "sgd") in rows and ("**step**", "") in rows
    assert "sgemm peak" in p.stdout
