"""The validation split: which training examples a run holds out, a function of (n, size, seed) alone.

    train_idx, val_idx = validation_split(n, val_size, seed)    # disjoint, sorted

The default split is 1/12 of the training examples (5,000 of MNIST's 60,000, as in the LeNet/MNIST
literature's 55,000 + 5,000; 166 of the 2,000 shipped): enough to rank checkpoints (one example is 0.02
points of accuracy at 5,000), little enough to leave training almost the data it had. A checkpoint records
the split (data/identity.py) and an evaluator rebuilds it with rebuild_validation.
"""
from __future__ import annotations

import hashlib

import numpy as np

VAL_FRACTION_DEN = 12           # default validation split: n // 12


def default_val_size(n: int) -> int:
    return n // VAL_FRACTION_DEN


def val_size_of(n: int, val_size: int | None) -> int:
    """The examples held out of n for a config's val_size: -1 is the default; None (a checkpoint from before
    validation splits) is 0, since such runs trained on all n."""
    if val_size is None:
        return 0
    return default_val_size(n) if val_size < 0 else val_size


def validation_split(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, validation indices) of n examples: `size` of them, drawn with `seed`, held out."""
    if not 0 <= size < n:
        raise ValueError(f"--val-size must be in [0, {n - 1}] for {n} training examples, got {size}")
    perm = np.random.default_rng([seed, 0x7A1]).permutation(n)   # its own stream: not the epochs' orders
    return np.sort(perm[size:]), np.sort(perm[:size])


def indices_sha256(idx: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(idx, dtype="<i8").tobytes()).hexdigest()


def rebuild_validation(record: dict, n_available: int) -> np.ndarray | None:
    """The validation indices a checkpoint's meta["data"] describes (None when it has no split); raises
    ValueError when they cannot be rebuilt from this data exactly."""
    split = (record or {}).get("split")
    if not split or not split.get("val_size"):
        return None
    n, size, seed = int(split["of"]), int(split["val_size"]), int(split["seed"])
    if n > n_available:
        raise ValueError(f"the split was drawn from {n} training examples, this data has {n_available}")
    _, val = validation_split(n, size, seed)
    if indices_sha256(val) != split.get("val_sha256"):
        raise ValueError("the validation split rebuilt here differs from the one recorded (another version?)")
    return val
