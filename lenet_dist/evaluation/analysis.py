"""What a checkpoint gets right and wrong, and what it sees: the figures behind the dashboard's pictures.

    analyse(model, images, labels)   one pass over a test set: loss and accuracy (the same figures as
                                     LeNet5.evaluate), the 10x10 confusion matrix, per-class accuracy, and
                                     the examples it gets most confidently wrong
    prepare_digit(ink)               a drawing (any size, bright ink on dark, values in [0, 1]) made the way
                                     MNIST's digits were: crop to the ink, scale into 20x20 keeping the
                                     aspect, centre by centre of mass in 28x28 -> uint8 (28, 28)
    probabilities(model, u8)         softmax over the ten classes for uint8 images (N, 28, 28)
    feature_maps(model, u8)          conv1's six 28x28 and conv2's sixteen 10x10 maps (after ReLU) of one digit
    look(model, u8)                  its probabilities and feature maps from one forward pass

Pure NumPy; no sockets, no web. The model passed in is used for its forward pass only (its scratch
buffers are overwritten: callers that share one across threads hold a lock).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lenet_dist.data import normalize

N_CLASSES = 10
INK = 0.05          # a drawing's pixel counts as ink above this (of 1.0): antialiasing haze is not ink


@dataclass
class Analysis:
    loss: float                     # mean cross-entropy
    accuracy: float                 # fraction correct
    confusion: np.ndarray           # (10, 10) int64: row = true class, column = predicted class
    worst: list = field(default_factory=list)   # dicts: index, label, predicted, confidence; most confident first

    @property
    def per_class(self):
        """Accuracy of each true class (None for a class absent from the test set)."""
        rows = self.confusion.sum(axis=1)
        return [float(self.confusion[c, c] / rows[c]) if rows[c] else None for c in range(N_CLASSES)]

    def to_dict(self):
        return {"loss": self.loss, "accuracy": self.accuracy, "confusion": self.confusion.tolist(),
                "per_class": self.per_class, "worst": self.worst}


def analyse(model, images, labels, batch_size=128, worst=16):
    """One pass over uint8 images (N,28,28) and labels (N,). Loss and accuracy are computed exactly as
    LeNet5.evaluate computes them (same batches, same operations), so the figures agree to the bit."""
    n = len(images)
    confusion = np.zeros((N_CLASSES, N_CLASSES), np.int64)
    wrong_conf, wrong_idx, wrong_pred = [], [], []
    total_loss, correct, buf = 0.0, 0, None
    for lo in range(0, n, batch_size):
        u8 = images[lo:lo + batch_size]
        if buf is None or len(buf) != len(u8):
            buf = np.empty(u8.shape, model.dtype)
        y = labels[lo:lo + batch_size].astype(np.intp)
        logits = model.forward(normalize(u8, out=buf))                  # (10, B)
        total_loss += float(model.loss.forward(logits, y).sum(dtype=np.float64))
        pred = logits.argmax(axis=0)
        correct += int((pred == y).sum())
        confusion += np.bincount(y * N_CLASSES + pred, minlength=N_CLASSES ** 2).reshape(N_CLASSES, N_CLASSES)
        miss = np.flatnonzero(pred != y)
        if len(miss):
            p = model.loss.p                                            # softmax of this batch, (10, B)
            wrong_conf.append(p[pred[miss], miss])
            wrong_idx.append(miss + lo)
            wrong_pred.append(pred[miss])
    out = Analysis(total_loss / max(n, 1), correct / max(n, 1), confusion)
    if wrong_idx and worst > 0:
        conf, idx, pred = (np.concatenate(a) for a in (wrong_conf, wrong_idx, wrong_pred))
        order = np.lexsort((idx, -conf))[:worst]                        # most confident first; ties by index
        out.worst = [{"index": int(idx[i]), "label": int(labels[idx[i]]), "predicted": int(pred[i]),
                      "confidence": float(conf[i])} for i in order]
    return out


def probabilities(model, u8):
    """uint8 images (N,28,28) -> (N, 10) float64 class probabilities."""
    logits = model.forward(normalize(np.asarray(u8, np.uint8)).astype(model.dtype, copy=False))
    z = logits.astype(np.float64) - logits.max(axis=0, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=0, keepdims=True)).T


def feature_maps(model, u8):
    """One uint8 digit (28,28) -> {"conv1": (6,28,28), "conv2": (16,10,10)} float32 activations after
    ReLU (before pooling)."""
    return look(model, u8)[1]


def look(model, u8):
    """One uint8 digit (28,28) -> (its 10 class probabilities, feature_maps) from one forward pass.
    The convolutions give their output pool-major, (C, row parity, column parity, H/2, W/2, B);
    interleaving the parities back gives the ordinary (C, H, W) picture."""
    x = normalize(np.asarray(u8, np.uint8)[None]).astype(model.dtype, copy=False)   # (1,28,28)
    h = model.layers[0].forward(x.transpose(1, 2, 0)[None], False)     # conv1: (6,2,2,14,14,1)
    maps = {"conv1": np.maximum(_spatial(h), 0)}
    h = model.layers[2].forward(model.layers[1].forward(h, False), False)  # pool+ReLU, conv2: (16,2,2,5,5,1)
    maps["conv2"] = np.maximum(_spatial(h), 0)
    for layer in model.layers[3:]:                                      # the rest of LeNet5.forward
        h = layer.forward(h, False)
    z = h[:, 0].astype(np.float64) - h.max()
    return np.exp(z) / np.exp(z).sum(), maps


def _spatial(pool_major):
    C, _, _, h, w, _ = pool_major.shape
    return np.ascontiguousarray(pool_major[..., 0].transpose(0, 3, 1, 4, 2).reshape(C, 2 * h, 2 * w))


# ------------------------------------------------------------------------------------- a drawn digit

def prepare_digit(ink):
    """A drawing, (H, W) floats in [0, 1] with 1 the brightest ink on a dark ground, -> uint8 (28, 28)
    prepared as MNIST's digits were: the ink's bounding box scaled (area-averaged, aspect kept) so that
    its longer side is 20 pixels, then placed in 28x28 with its centre of mass at the centre.
    ValueError for a drawing without ink or values outside [0, 1]."""
    a = np.asarray(ink, np.float64)
    if a.ndim != 2 or min(a.shape) < 1:
        raise ValueError(f"a drawing is a 2-D array, got shape {a.shape}")
    if not np.isfinite(a).all() or a.min() < 0.0 or a.max() > 1.0:
        raise ValueError("drawing values must be in [0, 1]")
    rows, cols = np.flatnonzero((a > INK).any(axis=1)), np.flatnonzero((a > INK).any(axis=0))
    if not len(rows):
        raise ValueError("the drawing has no ink")
    box = a[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = box.shape
    scale = 20.0 / max(h, w)
    oh, ow = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    small = _area_matrix(oh, h) @ box @ _area_matrix(ow, w).T          # (oh, ow)
    mass = small.sum()
    r = (small.sum(axis=1) @ (np.arange(oh) + 0.5)) / mass                   # centre of mass in the box
    c = (small.sum(axis=0) @ (np.arange(ow) + 0.5)) / mass
    top = int(np.clip(round(14.0 - r), 0, 28 - oh))
    left = int(np.clip(round(14.0 - c), 0, 28 - ow))
    out = np.zeros((28, 28))
    out[top:top + oh, left:left + ow] = small
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def _area_matrix(n_out, n_in):
    """(n_out, n_in) weights of an area-averaging resize along one axis: output cell i averages the input
    span [i*n_in/n_out, (i+1)*n_in/n_out), partial input cells counted by their overlap."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None)
    return overlap / (n_in / n_out)
