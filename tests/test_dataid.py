"""The validation split and the data identity a checkpoint records (lenet_dist/data/split.py, identity.py), and model
selection on validation only (the evaluator's --best-dir)."""
import json

import numpy as np
import pytest

from lenet_dist.data.identity import data_mismatch, data_record
from lenet_dist.data.split import default_val_size, rebuild_validation, validation_split
from workers.evaluator import BestKeeper

IDENT = {"name": "mnist", "sha256": {"train_images": "a" * 64, "train_labels": "b" * 64,
                                     "test_images": "c" * 64, "test_labels": "d" * 64}}


def test_default_sizes_are_a_twelfth():
    assert default_val_size(60_000) == 5_000 and default_val_size(2_000) == 166 and default_val_size(11) == 0


def test_split_is_disjoint_complete_sorted_and_a_function_of_its_arguments():
    tr, va = validation_split(1000, 100, seed=3)
    assert len(va) == 100 and len(tr) == 900
    assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(1000))
    assert np.all(np.diff(tr) > 0) and np.all(np.diff(va) > 0)
    assert np.array_equal(validation_split(1000, 100, seed=3)[1], va)
    assert not np.array_equal(validation_split(1000, 100, seed=4)[1], va)
    assert len(validation_split(1000, 0, seed=3)[1]) == 0
    with pytest.raises(ValueError, match=r"--val-size must be in \[0, 999\] for 1000 training examples, got 1000"):
        validation_split(1000, 1000, seed=3)


def test_the_record_rebuilds_the_same_split_and_catches_a_different_one():
    rec = data_record(IDENT, 1000, 100, seed=3)
    assert rec["name"] == "mnist" and rec["split"]["val_size"] == 100
    assert np.array_equal(rebuild_validation(rec, 1000), validation_split(1000, 100, 3)[1])
    assert rebuild_validation(data_record(IDENT, 1000, 0, 3), 1000) is None
    assert rebuild_validation({"name": "old"}, 1000) is None
    with pytest.raises(ValueError, match="drawn from 1000 training examples, this data has 500"):
        rebuild_validation(rec, 500)
    tampered = json.loads(json.dumps(rec))
    tampered["split"]["val_sha256"] = "0" * 64
    with pytest.raises(ValueError, match="differs from the one recorded"):
        rebuild_validation(tampered, 1000)


def test_data_identity_is_the_files_not_the_name():
    assert data_mismatch(data_record(IDENT, 10, 0, 0), IDENT) is None
    assert data_mismatch(dict(IDENT, name="idx"), IDENT) is None          # the same files loaded as idx
    assert data_mismatch(None, IDENT) is None                            # an older checkpoint
    other = dict(IDENT, sha256=dict(IDENT["sha256"], test_labels="e" * 64))
    assert data_mismatch(other, IDENT) == ("1 of 4 files differ: it was trained on 'mnist' whose test labels "
                                           "have sha256 eeeeeeeeeeee..., this is 'mnist' with dddddddddddd...")


def result(step, val, test):
    return {"step": step, "val_accuracy": val, "accuracy": test, "n_val": 100, "n_test": 200}


def test_best_is_chosen_on_validation_never_on_test(tmp_path):
    keep = BestKeeper(tmp_path)
    assert keep.offer(result(10, 0.90, 0.80), b"ten", {"seed": 0})
    assert not keep.offer(result(20, 0.89, 0.99), b"twenty", {"seed": 0})   # better on test only: not kept
    assert (tmp_path / "best.npz").read_bytes() == b"ten"
    assert keep.offer(result(30, 0.91, 0.70), b"thirty", {"seed": 0})
    assert json.loads((tmp_path / "best.json").read_text())["step"] == 30
    # a restarted evaluator carries on from best.json
    assert not BestKeeper(tmp_path).offer(result(40, 0.905, 0.99), b"forty", {"seed": 0})


def test_without_a_validation_split_nothing_is_chosen(tmp_path):
    keep = BestKeeper(tmp_path)
    assert not keep.offer({"step": 10, "accuracy": 0.99, "n_test": 200}, b"x", {})
    assert not (tmp_path / "best.npz").exists()
