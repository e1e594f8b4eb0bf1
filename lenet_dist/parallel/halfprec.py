"""Half-precision gradients for the compressed allreduce (--allreduce-dtype float16 | bfloat16): the
conversions, the scale every rank agrees on, and error feedback. No MPI here: compressed.py sends the
halves, comm.py moves them.

- float16 keeps 11 significant bits over 6e-8 .. 65504 (normal from 6.1e-5): a bucket is multiplied by a
  power of two (which changes no significant bit) chosen so that its largest possible partial sum sits
  HEADROOM below the largest half, so nothing overflows; values down to 2**-24 below the largest one keep
  full precision, and only those 2**-34 (1e-10) below it flush to zero (error feedback carries them on). Every rank must use the same scale; it comes from the previous step's reduced
  figures (see agreed_scale), which every rank holds bit for bit.
- bfloat16 keeps float32's range with 8 significant bits: the same scheme applies (the scale is large).
- Error feedback: what rounding to half lost on this rank (the residual) is added to this rank's next
  gradient before it is rounded. The applied gradients then sum, over any number of steps, to the float32
  sum minus the last residual (a telescoping sum), instead of drifting by the rounding's bias step after
  step. What the summation in half loses inside the collective (one rounding per addition) is not fed back.
"""
from __future__ import annotations

import math

import numpy as np

DTYPES = ("float32", "float16", "bfloat16")
HALF_MAX = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38}
HEADROOM = 64.0         # a bucket's sums may grow 64x from one step to the next before one overflows (the
                        # bucket is then sent again in float32: compressed.py)
STORAGE = {"float16": np.float16, "bfloat16": np.uint16}     # bfloat16 travels as its bits


def to_bfloat16(x):
    """float32 array -> bfloat16 bits (uint16), rounded to nearest, ties to even."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def to_float16(x, out=None):
    """float32 array -> float16, rounded to nearest, ties to even (NumPy's cast: hardware F16C where there
    is one, faster than integer arithmetic; docs/scaling.md). `out`: a float16 array to write into."""
    with np.errstate(over="ignore"):                    # too large: inf, seen where the sum is checked
        h = np.asarray(x, np.float32).astype(np.float16)
    if out is None:
        return h
    out[...] = h            # a cast straight into a view not 32-byte aligned is slower (docs/scaling.md)
    return out


def from_bfloat16(bits):
    """bfloat16 bits (uint16) -> float32 (exact)."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def agreed_scale(bound, dtype):
    """The power of two a bucket is multiplied by before it is rounded to `dtype`, from `bound`: the sum over
    ranks of each rank's largest |gradient| in that bucket (a bound on every partial sum of the reduction)
    at the previous step. None (send float32 this time) when there is no usable bound yet."""
    if not (0.0 < bound < math.inf):
        return None
    exponent = math.floor(math.log2(HALF_MAX[dtype] / (HEADROOM * bound)))
    return 2.0 ** min(max(exponent, -100), 100)         # the scale and its inverse stay float32 numbers


def encode(g, residual, scale, dtype, out):
    """Round `g * scale` to `dtype` into `out`, with error feedback: `g` (this rank's float32 gradient) first
    takes in `residual` (what rounding lost last time), then `residual` becomes what rounding loses now, in
    gradient units. `g` and `residual` are updated in place."""
    g += residual
    with np.errstate(over="ignore", invalid="ignore"):    # an overflow is seen in the sum and handled there
        if dtype == "float16":
            np.multiply(g, np.float32(scale), out=residual)
            to_float16(residual, out=out)                  # the rounding
        else:
            out[...] = to_bfloat16(g * np.float32(scale))
        np.subtract(g, decode(out, scale, dtype), out=residual)
    return out


def decode(h, scale, dtype, out=None):
    """float32 values of the half array `h` divided by `scale` (a power of two: exact)."""
    f = h.astype(np.float32) if dtype == "float16" else from_bfloat16(h)
    return np.multiply(f, np.float32(1.0 / scale), out=out)


def all_finite(h, dtype):
    """No inf or NaN in the half array `h` (a sum overflowed)."""
    bits, ones = (h.view(np.uint16), np.uint16(0x7C00)) if dtype == "float16" else (h, np.uint16(0x7F80))
    return not bool(((bits & ones) == ones).any())                             # exponent all ones
