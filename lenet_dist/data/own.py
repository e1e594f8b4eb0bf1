"""A user's own data set: four IDX files in a folder, in MNIST's layout, checked by structure, not by pins.

    ds = load_idx_dir("my-data")     # train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-... (gz or raw)

Each file must be an IDX file of unsigned bytes (read by data/idx.py, header before data), images of 28x28
with magic 0x00000803 and labels with magic 0x00000801, as many labels as images, labels in 0..9. Every
failure is a one-line DataError naming the file and what is wrong with it.
"""
from pathlib import Path

import numpy as np

from lenet_dist.data.dataset import DataError, Dataset
from lenet_dist.data.idx import locate, read_idx_hashed
from lenet_dist.data.sources import MNIST

SIDE = 28                                   # LeNet-5 as built here takes 28x28 single-channel images


def _images(path: Path, arr: np.ndarray) -> np.ndarray:
    if arr.ndim != 3:
        shape = "x".join(map(str, arr.shape))
        what = " (colour or multi-channel images?)" if arr.ndim == 4 else ""
        raise DataError(f"{path}: IDX magic 0x{arr.ndim | 0x800:08x}, {arr.ndim} dimensions ({shape}){what}; "
                        f"images need 0x00000803: N grey images of {SIDE}x{SIDE}")
    if arr.shape[1:] != (SIDE, SIDE):
        raise DataError(f"{path}: images are {arr.shape[1]}x{arr.shape[2]}, but LeNet-5 here takes {SIDE}x{SIDE}: "
                        f"resize or pad them to {SIDE}x{SIDE}")
    if len(arr) == 0:
        raise DataError(f"{path}: holds no images")
    return arr


def _labels(path: Path, arr: np.ndarray, images: np.ndarray, images_path: Path) -> np.ndarray:
    if arr.ndim != 1:
        shape = "x".join(map(str, arr.shape))
        raise DataError(f"{path}: IDX magic 0x{arr.ndim | 0x800:08x}, {arr.ndim} dimensions ({shape}); labels "
                        f"need 0x00000801: one byte per image")
    if len(arr) != len(images):
        raise DataError(f"{path}: {len(arr)} labels for the {len(images)} images of {images_path.name}; "
                        f"the counts must match")
    if arr.size and arr.max() > 9:
        bad = int(np.argmax(arr > 9))
        raise DataError(f"{path}: label {arr[bad]} at index {bad}; labels must be class numbers 0..9")
    return arr


def load_idx_dir(directory) -> Dataset:
    """The four IDX files of `directory` (gzipped or raw), structurally checked; name "idx"."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"{d}: not a folder (--data-dir must name a folder holding the four IDX files)")
    paths, arrays, sha = {}, {}, {}
    for key, (name, _) in MNIST.files.items():
        path = locate(d, name)          # a raw and a .gz copy that differ: refused, naming both
        if path is None:
            raise DataError(f"{d}: no {name} (looked for it with and without .gz)")
        paths[key] = path
        arrays[key], sha[key] = read_idx_hashed(path)
    for split in ("train", "test"):
        images = _images(paths[f"{split}_images"], arrays[f"{split}_images"])
        _labels(paths[f"{split}_labels"], arrays[f"{split}_labels"], images, paths[f"{split}_images"])
    return Dataset(**arrays, source=f"idx folder {d}", name="idx", sha256=sha)
