"""Layers as small classes: parameters and gradients as named arrays, forward keeps what backward needs.

Activations are laid out (C,H,W,B): channels, height, width, batch last. Every spatial slice then has the
batch as a contiguous inner run, so im2col and col2im are block copies, the 2x2 pool is a reshape, and the
convolution output of one GEMM is already the next layer's input. Dense layers take (features, B).
(NHWC leaves inner runs of only C floats: im2col and col2im several times slower; docs/performance.md.)
Weights stay in PyTorch layout (out, in, kh, kw) so checkpoints load elsewhere.
What the time goes to (batch 64, one thread): the conv GEMMs, memory-bound at these shapes (OpenBLAS packs
both operands and zeroes the output first), then im2col copies; NumPy ufuncs whose INPUT is strided run
~3x slower than contiguous ones, so the pool and col2im are arranged to read contiguous blocks.
Every layer works in the dtype it was built with (float32 in training, float64 in gradient checks).
Scratch arrays are reused between steps (`Workspace`): allocating a fresh 5 MB im2col matrix every step
costs page faults that show up in the profile; one buffer per name serves every batch size. Ranks that take
turns on one core may back their scratch with one shared `ScratchArena` (parallel/turns.py). The
convolutions live in conv.py.
"""
from __future__ import annotations

import math

import numpy as np


class ScratchArena:
    """Memory that several processes' Workspaces use one at a time: the ranks that take turns on one core
    (parallel/turns.py), so that the arrays one rank's step leaves in the core's cache are the ones the next
    rank's step writes. Arrays are carved from `mem` (a uint8 array, e.g. an MPI shared window) in the order
    asked for and never freed; None once it is full. Contents last only while this process holds the arena
    (`active`): the next holder overwrites them."""

    ALIGN = 4096

    def __init__(self, mem):
        self.mem, self.used, self.active = mem, 0, False

    def take(self, n, dtype):
        """A fresh flat array of n elements of `dtype`, page-aligned, or None when it does not fit."""
        base = self.mem.ctypes.data
        start = -(base + self.used) % self.ALIGN + self.used
        end = start + n * np.dtype(dtype).itemsize
        if end > len(self.mem):
            return None
        self.used = end
        return self.mem[start:end].view(dtype)


class Workspace:
    """Reusable scratch arrays by name. Each name owns one flat buffer, grown to the largest size asked for;
    an array of any shape is a contiguous view of its start. So a layer that sees several batch sizes
    (training shard, last partial batch, evaluation, --balance moving the cut) holds one buffer per name,
    not one per shape, and page-faults only when the largest shape grows. An array asked for with `zero`
    or `init` is initialized again whenever its shape differs from the last one asked for under its name
    (what those set up, a zero border or a row of ones, depends on the shape).

    While `arena` (a ScratchArena) is active, arrays come from it instead, one per name, and `zero` and
    `init` apply at every call: another process wrote there since (its own shapes, in its own order)."""

    def __init__(self, dtype):
        self.dtype, self._flat, self._shape = np.dtype(dtype), {}, {}
        self._last = {}                 # name -> (shape, dtype, the array last handed out)
        self.arena = None
        self._shared = {}               # name -> its flat array in the arena (None: the arena was full)

    @property
    def nbytes(self):
        """Bytes of this process's own buffers."""
        return sum(f.nbytes for f in self._flat.values())

    def get(self, name, shape, zero=False, dtype=None, init=None):
        """The array `name` with this shape: zeroed if `zero`, then `init(a)` if given, on first use or
        after a change of shape; otherwise exactly as the last call under this name left it. (While the
        arena is active: from the arena, zeroed and initialized at every call.)"""
        if self.arena is not None and self.arena.active:
            a = self._from_arena(name, shape, dtype)
            if a is not None:
                if zero:
                    a.fill(0)
                if init is not None:
                    init(a)
                return a
        shape, dt = tuple(shape), self.dtype if dtype is None else np.dtype(dtype)
        last = self._last.get(name)
        if last is not None and last[0] == shape and last[1] == dt:     # the common case: a step like the last
            return last[2]
        n = math.prod(shape)
        flat = self._flat.get(name)
        fresh = flat is None or flat.size < n or flat.dtype != dt
        if fresh:
            flat = self._flat[name] = np.empty(n, dt)
        a = flat[:n].reshape(shape)
        if fresh or self._shape.get(name) != shape:
            if zero:
                a.fill(0)
            if init is not None:
                init(a)
            self._shape[name] = shape
        self._last[name] = (shape, dt, a)
        return a

    def _from_arena(self, name, shape, dtype):
        """The arena's array `name` with this shape, or None: this name's buffer did not fit in the arena."""
        dt = self.dtype if dtype is None else np.dtype(dtype)
        n = math.prod(shape)
        flat = self._shared.get(name, False)
        if flat is False or (flat is not None and (flat.size < n or flat.dtype != dt)):
            flat = self._shared[name] = self.arena.take(n, dt)
        return None if flat is None else flat[:n].reshape(shape)


class Layer:
    """Base: `params` and `grads` map a name to an array of the same shape; the model may rebind both to
    views into one flat buffer (see LeNet5._bind_flat in model.py), so layers must write gradients in place."""

    params: dict
    grads: dict

    def forward(self, x, train=True):
        """`train=False`: inference only, keep nothing for backward."""
        raise NotImplementedError

    def backward(self, dout):
        raise NotImplementedError


def uniform_init(rng, fan_in, shape, dtype):
    # PyTorch's default for conv and linear layers (weights and biases): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    # Not He init: its larger weights, maxed by the pools, saturate the softmax early (docs/performance.md).
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


class MaxPool2D(Layer):
    """2x2 max-pool, stride 2, optionally followed by a ReLU (`relu=True`: relu(max(window)) in one layer,
    one pass and one mask less). x (C,H,W,B) with even H, W, or the pool-major (C,2,2,H/2,W/2,B) that
    Conv2D(pool_major=True), BandedConv2D and StripConv2D give -> (C,H/2,W/2,B). dx comes back in the
    layout x came in.

    The four window members are views of x (a reshape; contiguous blocks when x is pool-major). Ties go
    to the first maximum in window order (top-left, top-right, bottom-left, bottom-right): left wins
    within a row, then the top row wins, so a window's whole gradient lands on one input, deterministically.
    """

    params: dict = {}
    grads: dict = {}

    def __init__(self, dtype=np.float32, relu=False):
        self.ws, self.relu = Workspace(dtype), relu

    @staticmethod
    def _members(x):
        """(C,2,2,H/2,W/2,B) view of x: [:, a, b] is window member (row a, column b)."""
        if x.ndim == 6:
            return x
        C, H, W, B = x.shape
        if H % 2 or W % 2:
            raise ValueError(f"MaxPool2D needs even height and width, got {H}x{W}")
        return x.reshape(C, H // 2, 2, W // 2, 2, B).transpose(0, 2, 4, 1, 3, 5)

    # A pool-major input whose channels hold at least this many outputs each is pooled channel by channel:
    # each channel's members are then contiguous and its passes stay in cache (large batches); below it,
    # the calls' fixed cost outweighs that, and the whole tensor is one pass per operation.
    CHANNEL_PARTS_FROM = 32768

    def _parts(self, x):
        """Channel ranges the passes run over, one after the other: each element's operations are the same."""
        C, n = x.shape[0], x[0].size // 4
        if x.ndim == 6 and n >= self.CHANNEL_PARTS_FROM:
            return [slice(c, c + 1) for c in range(C)]
        return [slice(None)]

    def forward(self, x, train=True):
        m = self._members(x)
        q = m.shape[:1] + m.shape[3:]                                    # (C,H/2,W/2,B)
        top, bot, out = self.ws.get("top", q), self.ws.get("bot", q), self.ws.get("out", q)
        if train:
            self.xshape = x.shape
            masks = [self.ws.get(name, q, dtype=bool) for name in ("tlw", "blw", "topw", "live")]
            self.tl_wins, self.bl_wins, self.top_wins, self.live = masks
        for c in self._parts(x):
            tl, tr, bl, br = m[c, 0, 0], m[c, 0, 1], m[c, 1, 0], m[c, 1, 1]
            np.maximum(tl, tr, out=top[c])
            np.maximum(bl, br, out=bot[c])
            np.maximum(top[c], bot[c], out=out[c])
            if train:
                np.greater_equal(tl, tr, out=self.tl_wins[c])
                np.greater_equal(bl, br, out=self.bl_wins[c])
                np.greater_equal(top[c], bot[c], out=self.top_wins[c])
            if self.relu:
                np.maximum(out[c], 0, out=out[c])
                if train:
                    np.greater(out[c], 0, out=self.live[c])
        return out

    def backward(self, dout):
        # Every input position is written below, so dx needs no zeroing. (Multiplying by the boolean masks,
        # not np.where, which is slower; g - g*m is exact, as m is 0 or 1.)
        g, g_top, g_bot = (self.ws.get(name, dout.shape) for name in ("g", "gtop", "gbot"))
        dx = self.ws.get("dx", self.xshape)
        m = self._members(dx)
        for c in self._parts(dx):
            d = np.multiply(dout[c], self.live[c], out=g[c]) if self.relu else dout[c]
            np.multiply(d, self.top_wins[c], out=g_top[c])
            np.subtract(d, g_top[c], out=g_bot[c])
            np.multiply(g_top[c], self.tl_wins[c], out=m[c, 0, 0])
            np.subtract(g_top[c], m[c, 0, 0], out=m[c, 0, 1])
            np.multiply(g_bot[c], self.bl_wins[c], out=m[c, 1, 0])
            np.subtract(g_bot[c], m[c, 1, 0], out=m[c, 1, 1])
        return dx


class ReLU(Layer):
    params: dict = {}
    grads: dict = {}

    def forward(self, x, train=True):
        if train:
            self.mask = x > 0
        return np.maximum(x, 0)

    def backward(self, dout):
        return np.multiply(dout, self.mask)


class Dense(Layer):
    """Fully connected on column batches: x (in,B) -> W @ x + b, W (out,in) as in PyTorch -> (out,B).
    np.matmul rather than `@`, so that bench/layer_table.py's wrapper sees these GEMMs too."""

    def __init__(self, nin, nout, *, rng, dtype=np.float32):
        self.params = {"weight": uniform_init(rng, nin, (nout, nin), dtype), "bias": uniform_init(rng, nin, (nout,), dtype)}
        self.grads = {n: np.zeros_like(p) for n, p in self.params.items()}

    def forward(self, x, train=True):
        self.x = x if train else None
        out = np.matmul(self.params["weight"], x)              # (out,in) @ (in,B)
        out += self.params["bias"][:, None]
        return out

    def backward(self, dout):
        np.matmul(dout, self.x.T, out=self.grads["weight"])   # (out,B) @ (B,in)
        np.sum(dout, axis=1, out=self.grads["bias"])
        return np.matmul(self.params["weight"].T, dout)        # (in,B)


class Flatten(Layer):
    """(C,H,W,B) -> (C*H*W, B): a reshape, and the feature order is (C,H,W), as PyTorch flattens NCHW."""

    params: dict = {}
    grads: dict = {}

    def forward(self, x, train=True):
        self.xshape = x.shape
        return x.reshape(-1, x.shape[-1])

    def backward(self, dout):
        return dout.reshape(self.xshape)


class SoftmaxCrossEntropy:
    """Stable softmax cross-entropy on column logits. forward(logits (n,B), y (B,)) -> losses (B,).

    `smoothing` eps is label smoothing (Szegedy et al. 2016; PyTorch's `label_smoothing`): the target is
    1 - eps on the label plus eps/n on every class, and forward returns THAT loss per example,
    (1 - eps) * CE + eps * mean_k(-log p_k): what training minimizes and reports as its loss. eps = 0 is the
    plain cross-entropy, computed as before; evaluation uses a plain one so that figures stay comparable.
    """

    def __init__(self, smoothing=0.0):
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {smoothing!r}")
        self.smoothing = smoothing

    def forward(self, logits, y):
        z = logits - logits.max(axis=0, keepdims=True)         # shift: exp never overflows
        e = np.exp(z)
        s = e.sum(axis=0, keepdims=True)
        self.p, self.y = e / s, y                               # softmax (n,B)
        zy = z[y, np.arange(len(y))]                            # (B,)
        if not self.smoothing:
            return np.log(s[0]) - zy
        eps = self.smoothing                                    # -log p_k = log s - z_k, averaged over k
        return np.log(s[0]) - (1.0 - eps) * zy - eps * z.mean(axis=0)

    def backward(self, scale):
        """Gradient of `scale * sum(losses)` w.r.t. the logits, (n,B): scale * (softmax - target)."""
        d = self.p * scale
        if not self.smoothing:
            d[self.y, np.arange(len(self.y))] -= scale
            return d
        eps = self.smoothing
        d -= scale * (eps / d.shape[0])                         # the eps/n every class gets
        d[self.y, np.arange(len(self.y))] -= scale * (1.0 - eps)
        return d
