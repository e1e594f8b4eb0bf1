"""Small IDX data sets of our own, written as a user would hand them to `--dataset idx --data-dir DIR`."""
import gzip
import struct
from pathlib import Path

import numpy as np

NAMES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


def idx_bytes(arr, type_code=0x08):
    """An IDX file of `arr` (uint8) as bytes: magic 0x0000TTNN, big-endian dims, the data."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return struct.pack(">BBBB", 0, 0, type_code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def structured(n, seed):
    """Images a small net learns in one epoch: class k is a bright bar on row 4 + 2k, over faint noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for k in range(10):
        images[labels == k, 4 + 2 * k, 3:25] = 250
    return images, labels


def random(n, seed):
    """Noise with random labels: nothing to learn, everything else as real data."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28)).astype(np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def write_dir(directory, kind="structured", n_train=600, n_test=200, seed=0, gz=("train_images",), **override):
    """Write the four files into `directory` (the keys in `gz` gzipped); `override` replaces a file's bytes."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    make = structured if kind == "structured" else random
    (tri, trl), (tei, tel) = make(n_train, seed), make(n_test, seed + 1)
    arrays = {"train_images": tri, "train_labels": trl, "test_images": tei, "test_labels": tel}
    for key, name in NAMES.items():
        blob = override[key] if key in override else idx_bytes(arrays[key])
        if key in gz:
            (d / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (d / name).write_bytes(blob)
    return d
