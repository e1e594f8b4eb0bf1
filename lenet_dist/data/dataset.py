"""The in-memory data set every process trains and scores on, its one error type, and normalization.

    x = normalize(ds.train_images[idx], out=buf)   # per batch, into a preallocated float32 buffer

The arrays of a Dataset are read-only: index them (which copies), never modify them in place.
"""
from dataclasses import dataclass

import numpy as np


class DataError(Exception):
    """A data file is missing, corrupt or not what it claims to be; the message is one line."""


MEAN, STD = 0.1307, 0.3081
_SCALE = np.float32(1.0 / (255.0 * STD))  # normalize(u) = u * _SCALE + _SHIFT
_SHIFT = np.float32(-MEAN / STD)


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    train_images: np.ndarray  # (N, 28, 28) uint8
    train_labels: np.ndarray  # (N,) uint8, values 0..9
    test_images: np.ndarray   # (M, 28, 28) uint8
    test_labels: np.ndarray   # (M,) uint8
    source: str               # where the files came from, for logs
    name: str = "mnist"       # which data set: a name of sources.PINNED, "mnist-subset" or "idx" (a user's own files)
    sha256: dict | None = None  # key -> sha256 of the decompressed file: the data's identity in checkpoints

    def identity(self) -> dict:
        """What a checkpoint records about the data it was trained on (and an evaluator compares)."""
        return {"name": self.name, "sha256": dict(self.sha256 or {})}

    def __post_init__(self):
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
                raise DataError(f"{self.source}: {split} images are {images.dtype} {images.shape}, "
                                f"expected uint8 (N, 28, 28)")
            if labels.dtype != np.uint8 or labels.shape != images.shape[:1]:
                raise DataError(f"{self.source}: {split} labels are {labels.dtype} {labels.shape}, "
                                f"expected uint8 ({len(images)},) to match the images")
            if labels.size and labels.max() > 9:
                raise DataError(f"{self.source}: {split} labels contain {labels.max()}, expected 0..9")

    def __repr__(self):
        return (f"Dataset(train={self.train_images.shape}, test={self.test_images.shape}, "
                f"source={self.source!r})")


def normalize(u8: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 `(u8/255 - 0.1307)/0.3081`, into `out` when given (same shape, float32)."""
    if out is None:
        out = np.empty(u8.shape, dtype=np.float32)
    # cast, multiply, add in place: no temporary array per batch
    np.copyto(out, u8, casting="safe")
    np.multiply(out, _SCALE, out=out)
    np.add(out, _SHIFT, out=out)
    return out
