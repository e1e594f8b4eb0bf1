"""The default recipe (random shifts of 1 px, weight decay 2e-3, lr 0.07: docs/performance.md) and the
checkpoints saved before it was the default: a resumed run continues the recipe its checkpoint saved, not today's."""
import numpy as np

from lenet_dist.checkpoints import format as checkpoint
from lenet_dist.config import TrainConfig
from lenet_dist.data import load_subset, normalize
from lenet_dist.nn.model import LeNet5

from tests.mpiutil import final_params, launch

OLD = {"augment_shift": 0, "weight_decay": 5e-4, "lr": 0.05}  # the defaults before the measured recipes
OLD_FLAGS = ["--augment-shift", "0", "--weight-decay", "5e-4", "--lr", "0.05"]
# 2,000 subset examples / batch 20 = 100 steps; a checkpoint every 10
BASE = ["--subset", "--epochs", "1", "--batch-size", "20", "--seed", "7", "--no-progress", "--log-level", "WARNING",
        "--val-size", "0", "--checkpoint-every", "10"]


def test_the_defaults_are_the_recipe_docs_performance_measures():
    d = TrainConfig()
    assert (d.epochs, d.augment_shift, d.weight_decay, d.schedule) == (5, 1, 2e-3, "cosine")
    assert {k: getattr(d, k) for k in OLD} != OLD
    assert (d.lr, d.label_smoothing) == (0.07, 0.0)


def test_a_checkpoint_saved_with_the_old_defaults_resumes_with_them_bit_identical(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    launch(0, [*BASE, *OLD_FLAGS, "--checkpoint-dir", full])
    p = launch(0, [*BASE, *OLD_FLAGS, "--checkpoint-dir", part, "--fault", "0:45:exit"], check=False)
    assert p.returncode != 0
    p = launch(0, [*BASE, "--checkpoint-dir", part, "--resume", "--log-level", "INFO"])   # no recipe flags
    assert "resumed from" in p.stderr and "step 40" in p.stderr and "differs" not in p.stderr
    a, ma = final_params(full)
    b, mb = final_params(part)
    assert mb["step"] == 100 and {k: mb["config"][k] for k in OLD} == OLD
    assert not mb.get("config_changes")
    assert np.array_equal(a, b)                                # trained on with the saved recipe, bit for bit


def test_label_smoothing_changes_the_training_loss_only_evaluation_stays_plain():
    ds = load_subset()
    x, y = normalize(ds.train_images[:32]), ds.train_labels[:32].astype(np.intp)
    plain, smooth = LeNet5(0), LeNet5(0, label_smoothing=0.1)
    assert plain.loss_and_grad(x, y, 1.0)[0] != smooth.loss_and_grad(x, y, 1.0)[0]
    assert not np.array_equal(plain.grads, smooth.grads)
    assert plain.evaluate(ds.test_images, ds.test_labels) == smooth.evaluate(ds.test_images, ds.test_labels)


def test_a_checkpoint_saved_before_label_smoothing_resumes_without_it_bit_identical(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    launch(0, [*BASE, "--label-smoothing", "0", "--checkpoint-dir", full])
    p = launch(0, [*BASE, "--label-smoothing", "0", "--checkpoint-dir", part, "--fault", "0:45:exit"], check=False)
    assert p.returncode != 0
    for _, path in checkpoint.list_checkpoints(part):        # as written before the field existed
        c = checkpoint.load_file(path)
        del c.meta["config"]["label_smoothing"]
        path.write_bytes(checkpoint.to_bytes(c.params, c.velocity, c.meta))
    p = launch(0, [*BASE, "--checkpoint-dir", part, "--resume", "--log-level", "INFO"])   # no recipe flags
    assert "resumed from" in p.stderr and "step 40" in p.stderr and "differs" not in p.stderr
    a, _ = final_params(full)
    b, mb = final_params(part)
    assert mb["step"] == 100 and mb["config"]["label_smoothing"] == 0.0 and not mb.get("config_changes")
    assert np.array_equal(a, b)                                # trained on without smoothing, bit for bit
