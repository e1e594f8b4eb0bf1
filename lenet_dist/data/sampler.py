"""Which examples each step sees: a function of (seed, epoch, step) alone, identical on every rank.

Every rank draws the same global permutation, cuts the same global batches and takes its own contiguous
shard of each. Random shifts (augmentation) are drawn for the whole global batch and then sliced, so an
example gets the same shift whatever the number of ranks. Nothing here keeps state: resuming at (epoch,
step-in-epoch) replays exactly what an uninterrupted run would have drawn.
"""
from __future__ import annotations

import numpy as np


def epoch_permutation(seed, epoch, n):
    """The order of the n training examples in `epoch` (int64 indices)."""
    return np.random.default_rng([seed, epoch, 0]).permutation(n)


def steps_per_epoch(n, batch_size):
    """Global batches per epoch; the last one may be partial (nothing is dropped)."""
    return -(-n // batch_size)


def global_batch(perm, step_in_epoch, batch_size):
    """Indices of the global batch `step_in_epoch` of an epoch."""
    return perm[step_in_epoch * batch_size:(step_in_epoch + 1) * batch_size]


def shard_bounds(n, rank, size):
    """[lo, hi) of rank's share of n items: sizes differ by at most one, lower ranks take the extra ones.
    A rank may get nothing (n < size); its gradient contribution is then zero."""
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def random_shifts(seed, epoch, step_in_epoch, n, max_shift):
    """(n, 2) integer shifts in [-max_shift, max_shift] for the examples of one global batch."""
    rng = np.random.default_rng([seed, epoch, step_in_epoch + 1])
    return rng.integers(-max_shift, max_shift + 1, size=(n, 2))


def shift_images(images, shifts, max_shift):
    """Translate each uint8 image (B,28,28) by its (dy, dx), filling with zeros; one vectorized gather."""
    B, H, W = images.shape
    m = max_shift
    padded = np.zeros((B, H + 2 * m, W + 2 * m), images.dtype)
    padded[:, m:m + H, m:m + W] = images
    row, image = W + 2 * m, (H + 2 * m) * (W + 2 * m)                  # in elements
    _, s1, s2 = padded.strides
    # every H x W window of the padded batch, by the index of its first element (a view); a shift of +dy
    # moves the content down, so image b's window starts m - dy rows and m - dx columns into its padded image
    windows = np.ndarray((max(padded.size - (H - 1) * row - (W - 1), 0), H, W), padded.dtype, buffer=padded,
                         strides=(s2, s1, s2))
    return windows[np.arange(B) * image + (m - shifts[:, 0]) * row + (m - shifts[:, 1])]
