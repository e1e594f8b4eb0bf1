"""Numerical gradients for the tests (a helper module, not a test module).

CS231n style: central differences in float64, compared with the analytic gradient by the relative error
|a - b| / max(|a| + |b|, tiny) -- scale-free, so one tolerance serves gradients of any magnitude.
"""
from __future__ import annotations

import numpy as np


def numerical_gradient(f, x, h=1e-5, indices=None):
    """Central-difference gradient of the scalar `f(x)` w.r.t. the float64 array `x`.

    `x` is perturbed IN PLACE one coordinate at a time and restored exactly, so `x` may be a parameter array
    that `f` reads through some layer (f may then ignore its argument). `indices`: flat indices to
    differentiate (all by default); the result then holds only those coordinates, in that order.
    """
    assert x.dtype == np.float64, f"numerical gradients need float64, got {x.dtype}"
    flat = x.reshape(-1)
    assert np.shares_memory(flat, x), "x must be contiguous so that perturbations reach it"
    idx = range(flat.size) if indices is None else indices
    out = np.empty(len(idx), np.float64)
    for n, i in enumerate(idx):
        old = flat[i]
        flat[i] = old + h
        fp = float(f(x))
        flat[i] = old - h
        fm = float(f(x))
        flat[i] = old
        out[n] = (fp - fm) / (2.0 * h)
    return out.reshape(x.shape) if indices is None else out


def rel_errors(a, b, tiny=1e-8):
    """Elementwise |a - b| / max(|a| + |b|, tiny), in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return np.abs(a - b) / np.maximum(np.abs(a) + np.abs(b), tiny)


def rel_error(a, b, tiny=1e-8):
    """The largest elementwise relative error (0.0 for empty arrays)."""
    e = rel_errors(a, b, tiny)
    return float(e.max()) if e.size else 0.0
