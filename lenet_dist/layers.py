"""Layers as small classes: parameters and gradients as named arrays, forward keeps what backward needs.

Activations are laid out (C,H,W,B): channels, height, width, batch last. Every spatial slice then has the
batch as a contiguous inner run, so im2col and col2im are block copies, the 2x2 pool is a reshape, and the
convolution output of one GEMM is already the next layer's input. Dense layers take (features, B).
(Measured at batch 64: NHWC made im2col 8x and col2im 7x slower, with inner runs of only C floats.)
Weights stay in PyTorch layout (out, in, kh, kw) so checkpoints load elsewhere.
What the time goes to (batch 64, one thread): the conv GEMMs, memory-bound at these shapes (OpenBLAS packs
both operands and zeroes the output first), then im2col copies; NumPy ufuncs whose INPUT is strided run
~3x slower than contiguous ones, so the pool and col2im are arranged to read contiguous blocks.
Every layer works in the dtype it was built with (float32 in training, float64 in gradient checks).
Scratch arrays are reused between steps (`_Workspace`): allocating a fresh 5 MB im2col matrix every step
costs page faults that show up in the profile.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided


class _Workspace:
    """Reusable scratch arrays keyed by (name, shape); keeps a few shapes (train batch, last batch, eval)."""

    def __init__(self, dtype, keep=4):
        self.dtype, self.keep, self._arrays = np.dtype(dtype), keep, {}

    def get(self, name, shape, zero=False, dtype=None, init=None):
        """The array for (name, shape), made on first use: zeroed if `zero`, then `init(a)` if given."""
        key = (name, tuple(shape))
        a = self._arrays.pop(key, None)  # pop + reinsert keeps the dict in least-recently-used order
        if a is None:
            dt = self.dtype if dtype is None else dtype
            a = np.zeros(shape, dt) if zero else np.empty(shape, dt)
            if init is not None:
                init(a)
            names = [k for k in self._arrays if k[0] == name]
            for k in names[: max(0, len(names) - self.keep + 1)]:
                del self._arrays[k]
        self._arrays[key] = a
        return a


class Layer:
    """Base: `params` and `grads` map a name to an array of the same shape; the model may rebind both to
    views into one flat buffer (see model.bind_flat), so layers must write gradients in place."""

    params: dict
    grads: dict

    def forward(self, x, train=True):
        """`train=False`: inference only, keep nothing for backward."""
        raise NotImplementedError

    def backward(self, dout):
        raise NotImplementedError


def _uniform(rng, fan_in, shape, dtype):
    # PyTorch's default for conv and linear layers (weights and biases): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    # He init was tried: its larger weights, maxed by the pools, saturate the softmax early; on the
    # shipped subset it reached 46% after 96 steps where this reaches 90%.
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def _padding(padding, h, k, stride):
    """(low, high) zero padding for one spatial axis: 'valid', 'same' (TensorFlow rule) or an int."""
    if padding == "valid":
        return 0, 0
    if padding == "same":
        out = -(-h // stride)
        total = max((out - 1) * stride + k - h, 0)
        return total // 2, total - total // 2
    if isinstance(padding, int) and padding >= 0:
        return padding, padding
    raise ValueError(f"padding must be 'valid', 'same' or an int >= 0, got {padding!r}")


class Conv2D(Layer):
    """2-D convolution by im2col. x (Cin,H,W,B) -> (Cout,Ho,Wo,B). weight (Cout,Cin,k,k), bias (Cout,).

    The columns matrix is (Cin*k*k + 1, Ho*Wo*B): rows in (c,kh,kw) order, then a row of ones, so that
    [weight | bias] (Cout, Cin*k*k + 1) multiplies it as it is and the one GEMM also adds the bias; in
    backward the same GEMM gives the bias gradient as its last column. The product is already the next
    layer's (Cout,Ho,Wo,B).
    `need_dx=False` for the first layer: nobody needs the gradient w.r.t. the input images.
    `pool_major=True` (for a conv followed by the 2x2 max-pool; Ho, Wo even) orders the columns, and so the
    output, as (Cout,2,2,Ho/2,Wo/2,B): out[:, a, b, i, j] is output pixel (2i+a, 2j+b), so the four members
    of every pool window sit in four contiguous blocks and the pool reads no strided data.
    """

    def __init__(self, cin, cout, k, *, stride=1, padding="valid", rng, dtype=np.float32, need_dx=True,
                 pool_major=False):
        if stride < 1 or k < 1:
            raise ValueError(f"stride and kernel size must be >= 1, got stride={stride}, k={k}")
        self.cin, self.cout, self.k, self.stride, self.padding = cin, cout, k, stride, padding
        self.need_dx, self.pool_major = need_dx, pool_major
        self.params = {"weight": _uniform(rng, cin * k * k, (cout, cin, k, k), dtype),
                       "bias": _uniform(rng, cin * k * k, (cout,), dtype)}
        self.grads = {n: np.zeros_like(p) for n, p in self.params.items()}
        self.ws = _Workspace(dtype)

    def _geometry(self, h, w):
        (pt, pb), (pl, pr) = (_padding(self.padding, h, self.k, self.stride),
                              _padding(self.padding, w, self.k, self.stride))
        hp, wp = h + pt + pb, w + pl + pr
        ho, wo = (hp - self.k) // self.stride + 1, (wp - self.k) // self.stride + 1
        if ho < 1 or wo < 1:
            raise ValueError(f"input {h}x{w} is smaller than the {self.k}x{self.k} kernel")
        if self.pool_major and (ho % 2 or wo % 2):
            raise ValueError(f"pool_major needs an even output size, got {ho}x{wo}")
        return pt, pl, hp, wp, ho, wo

    def forward(self, x, train=True):
        C, H, W, B = x.shape
        assert C == self.cin, (x.shape, self.cin)
        k, s, K = self.k, self.stride, C * self.k * self.k
        pt, pl, hp, wp, ho, wo = self._geometry(H, W)
        if (hp, wp) != (H, W) or not x.flags.c_contiguous:
            xp = self.ws.get("xp", (C, hp, wp, B), zero=True)  # the border stays zero between calls
            xp[:, pt:pt + H, pl:pl + W] = x
        else:
            xp = x
        # im2col by one strided copy per block: cols[c,i,j, oh,ow, b] = xp[c, s*oh+i, s*ow+j, b] (25 block
        # copies, one per kernel offset, measured twice as slow for conv2). pool_major splits (oh, ow) into
        # (row parity, column parity, oh//2, ow//2), and then runs copy and GEMM one parity quarter at a time,
        # so that the GEMM reads its quarter of the columns (1.3 MB for conv1 at batch 64) while it is in cache.
        N = ho * wo * B
        wb = self.ws.get("wb", (self.cout, K + 1))                      # [weight | bias]
        wb[:, :K] = self.params["weight"].reshape(self.cout, K)
        wb[:, K] = self.params["bias"]
        out = self.ws.get("out", (self.cout, N))
        sc, sh, sw, sb = xp.strides
        if self.pool_major:
            n = N // 4
            cols = self.ws.get("cols", (K + 1, N if train else n), init=_ones_last_row)
            shape = (C, k, k, ho // 2, wo // 2, B)
            for q, (a, b) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
                block = cols[:, q * n:(q + 1) * n] if train else cols
                src = as_strided(xp[:, a * s:, b * s:], shape, (sc, sh, sw, 2 * s * sh, 2 * s * sw, sb), writeable=False)
                np.copyto(block[:K].reshape(shape), src)
                np.matmul(wb, block, out=out[:, q * n:(q + 1) * n])
        else:
            cols = self.ws.get("cols", (K + 1, N), init=_ones_last_row)      # (K+1, N)
            shape = (C, k, k, ho, wo, B)
            np.copyto(cols[:K].reshape(shape), as_strided(xp, shape, (sc, sh, sw, s * sh, s * sw, sb), writeable=False))
            np.matmul(wb, cols, out=out)                                 # (Cout, N)
        self.cols, self.xshape, self.geom = cols, x.shape, (pt, pl, hp, wp, ho, wo)
        if self.pool_major:
            return out.reshape(self.cout, 2, 2, ho // 2, wo // 2, B)
        return out.reshape(self.cout, ho, wo, B)

    def backward(self, dout):
        C, H, W, B = self.xshape
        pt, pl, hp, wp, ho, wo = self.geom
        k, s, K = self.k, self.stride, C * self.k * self.k
        d2 = dout.reshape(self.cout, ho * wo * B)                        # (Cout, N), in the columns' order
        dwb = self.ws.get("dwb", (self.cout, K + 1))
        np.matmul(d2, self.cols.T, out=dwb)                              # [dweight | dbias]
        self.grads["weight"].reshape(self.cout, K)[...] = dwb[:, :K]
        self.grads["bias"][...] = dwb[:, K]
        if not self.need_dx:
            return None
        if self.pool_major:                                              # back to (Cout,Ho,Wo,B) order
            std = self.ws.get("dstd", (self.cout, ho, wo, B))
            np.copyto(std.reshape(self.cout, ho // 2, 2, wo // 2, 2, B).transpose(0, 2, 4, 1, 3, 5), dout)
            d2 = std.reshape(self.cout, ho * wo * B)
        return self._col2im(d2, C, hp, wp, ho, wo, B)[:, pt:pt + H, pl:pl + W]

    def _col2im(self, d2, C, hp, wp, ho, wo, B):
        """dx on the padded input (C,hp,wp,B) from d2 (Cout, Ho*Wo*B), one kernel row at a time: dcols for
        row i, (k*C, N) = W[:, :, i, :]^T d2, is summed back by one strided add per kernel column j. The
        whole (K, N) dcols (3.8 MB for conv2 at batch 64, 15 MB at 256) measured slower: it goes out to
        memory and back; a row's slice stays in L2."""
        k, s = self.k, self.stride
        wt = self.ws.get("wt", (k, k * C, self.cout))                  # wt[i]: rows in (kw, c) order
        wt[...] = self.params["weight"].transpose(2, 3, 1, 0).reshape(k, k * C, self.cout)
        drow = self.ws.get("drow", (k * C, ho * wo * B))
        d5 = drow.reshape(k, C, ho, wo, B)
        dxp = self.ws.get("dxp", (C, hp, wp, B))
        dxp.fill(0)
        for i in range(k):
            np.matmul(wt[i], d2, out=drow)                               # (k*C, N)
            for j in range(k):
                dxp[:, i:i + s * ho:s, j:j + s * wo:s] += d5[j]
        return dxp


class BandedConv2D(Conv2D):
    """Conv2D(stride=1, pool_major=True) computed with a banded weight matrix: the same parameters, output
    (Cout,2,2,Ho/2,Wo/2,B) and gradients, from a columns matrix 40% smaller.

    One column serves two horizontally adjacent output pixels (2t, 2t+1): it holds the k x (k+1) input
    patch they read (per input channel), and the weight matrix has one row per (output channel, column
    parity) with the k x k kernel at column offset 0 or 1 of that patch (a band). For LeNet's conv1 a
    column holds 31 values per two outputs where im2col holds 2 x 26 (5 MB at batch 64), the GEMM is 12
    rows tall instead of 6, for 20% more multiply-adds; fewer bytes moved measured faster (see bench/).
    """

    def __init__(self, cin, cout, k, *, padding="valid", rng, dtype=np.float32, need_dx=True):
        super().__init__(cin, cout, k, stride=1, padding=padding, rng=rng, dtype=dtype, need_dx=need_dx,
                         pool_major=True)

    def forward(self, x, train=True):
        C, H, W, B = x.shape
        assert C == self.cin, (x.shape, self.cin)
        k, kv, Co = self.k, self.k + 1, self.cout
        pt, pl, hp, wp, ho, wo = self._geometry(H, W)
        if (hp, wp) != (H, W) or not x.flags.c_contiguous:
            xp = self.ws.get("xp", (C, hp, wp, B), zero=True)  # the border stays zero between calls
            xp[:, pt:pt + H, pl:pl + W] = x
        else:
            xp = x
        # cols[(c,i,v), (a,m,t,b)] = xp[c, 2m+a+i, 2t+v, b]: the patch of output pixels (2m+a, 2t) and
        # (2m+a, 2t+1); then a row of ones for the bias. One strided copy.
        Kb, n = C * k * kv, ho * wo * B // 2
        cols = self.ws.get("cols", (Kb + 1, n), init=_ones_last_row)
        sc, sh, sw, sb = xp.strides
        shape = (C, k, kv, 2, ho // 2, wo // 2, B)
        np.copyto(cols[:Kb].reshape(shape),
                  as_strided(xp, shape, (sc, sh, sw, sh, 2 * sh, 2 * sw, sb), writeable=False))
        # band[(o,p), (c,i,v)] = weight[o,c,i,v-p] where 0 <= v-p < k, p the output column parity
        band = self.ws.get("band", (Co * 2, Kb + 1), zero=True)          # the zeros off the band stay
        b5 = band[:, :Kb].reshape(Co, 2, C, k, kv)
        b5[:, 0, :, :, :k] = self.params["weight"]
        b5[:, 1, :, :, 1:] = self.params["weight"]
        band[:, Kb].reshape(Co, 2)[...] = self.params["bias"][:, None]
        out = self.ws.get("out", (Co * 2, n))
        np.matmul(band, cols, out=out)                                   # (Cout*2, N/2)
        self.cols, self.xshape, self.geom = cols, x.shape, (pt, pl, hp, wp, ho, wo)
        # rows (o, column parity p), columns (row parity a, m, t, b) -> the pool-major (o, a, p, m, t, b)
        return out.reshape(Co, 2, 2, ho // 2, wo // 2, B).transpose(0, 2, 1, 3, 4, 5)

    def backward(self, dout):
        C, H, W, B = self.xshape
        pt, pl, hp, wp, ho, wo = self.geom
        k, Co, Kb = self.k, self.cout, self.cin * self.k * (self.k + 1)
        d2 = dout.transpose(0, 2, 1, 3, 4, 5).reshape(Co * 2, -1)        # a view if laid out as out
        g = self.ws.get("g", (Co * 2, Kb + 1))
        np.matmul(d2, self.cols.T, out=g)                                # d band
        g5 = g[:, :Kb].reshape(Co, 2, C, k, k + 1)
        np.add(g5[:, 0, :, :, :k], g5[:, 1, :, :, 1:], out=self.grads["weight"])
        np.sum(g[:, Kb].reshape(Co, 2), axis=1, out=self.grads["bias"])
        if not self.need_dx:
            return None
        std = self.ws.get("dstd", (Co, ho, wo, B))                       # back to (Cout,Ho,Wo,B) order
        np.copyto(std.reshape(Co, ho // 2, 2, wo // 2, 2, B).transpose(0, 2, 4, 1, 3, 5), dout)
        return self._col2im(std.reshape(Co, -1), C, hp, wp, ho, wo, B)[:, pt:pt + H, pl:pl + W]


def _ones_last_row(a):
    a[-1] = 1


class MaxPool2D(Layer):
    """2x2 max-pool, stride 2, optionally followed by a ReLU (`relu=True`: relu(max(window)) in one layer,
    one pass and one mask less). x (C,H,W,B) with even H, W, or the pool-major (C,2,2,H/2,W/2,B) that
    Conv2D(pool_major=True) gives -> (C,H/2,W/2,B). dx comes back in the layout x came in.

    The four window members are views of x (a reshape; contiguous blocks when x is pool-major). Ties go
    to the first maximum in window order (top-left, top-right, bottom-left, bottom-right): left wins
    within a row, then the top row wins, so a window's whole gradient lands on one input, deterministically.
    """

    params: dict = {}
    grads: dict = {}

    def __init__(self, dtype=np.float32, relu=False):
        self.ws, self.relu = _Workspace(dtype), relu

    @staticmethod
    def _members(x):
        """(C,2,2,H/2,W/2,B) view of x: [:, a, b] is window member (row a, column b)."""
        if x.ndim == 6:
            return x
        C, H, W, B = x.shape
        if H % 2 or W % 2:
            raise ValueError(f"MaxPool2D needs even height and width, got {H}x{W}")
        return x.reshape(C, H // 2, 2, W // 2, 2, B).transpose(0, 2, 4, 1, 3, 5)

    def forward(self, x, train=True):
        m = self._members(x)
        q = m.shape[:1] + m.shape[3:]                                    # (C,H/2,W/2,B)
        tl, tr, bl, br = m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1]
        top = np.maximum(tl, tr, out=self.ws.get("top", q))
        bot = np.maximum(bl, br, out=self.ws.get("bot", q))
        out = np.maximum(top, bot, out=self.ws.get("out", q))
        if train:
            self.xlayout = (x.shape, sorted(range(x.ndim), key=lambda d: -x.strides[d]))
            self.tl_wins = np.greater_equal(tl, tr, out=self.ws.get("tlw", q, dtype=bool))
            self.bl_wins = np.greater_equal(bl, br, out=self.ws.get("blw", q, dtype=bool))
            self.top_wins = np.greater_equal(top, bot, out=self.ws.get("topw", q, dtype=bool))
        if self.relu:
            np.maximum(out, 0, out=out)
            if train:
                self.live = np.greater(out, 0, out=self.ws.get("live", q, dtype=bool))
        return out

    def backward(self, dout):
        if self.relu:
            dout = np.multiply(dout, self.live, out=self.ws.get("g", dout.shape))
        # Every input position is written below, so dx needs no zeroing. (Multiplying by the boolean masks
        # measured 5x faster than np.where; g - g*m is exact, as m is 0 or 1.)
        g_top = np.multiply(dout, self.top_wins, out=self.ws.get("gtop", dout.shape))
        g_bot = np.subtract(dout, g_top, out=self.ws.get("gbot", dout.shape))
        shape, order = self.xlayout                      # dx in x's memory order (see BandedConv2D)
        dx = self.ws.get("dx", tuple(shape[d] for d in order)).transpose(np.argsort(order))
        m = self._members(dx)
        np.multiply(g_top, self.tl_wins, out=m[:, 0, 0])
        np.subtract(g_top, m[:, 0, 0], out=m[:, 0, 1])
        np.multiply(g_bot, self.bl_wins, out=m[:, 1, 0])
        np.subtract(g_bot, m[:, 1, 0], out=m[:, 1, 1])
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
    """Fully connected on column batches: x (in,B) -> W @ x + b, W (out,in) as in PyTorch -> (out,B)."""

    def __init__(self, nin, nout, *, rng, dtype=np.float32):
        self.params = {"weight": _uniform(rng, nin, (nout, nin), dtype), "bias": _uniform(rng, nin, (nout,), dtype)}
        self.grads = {n: np.zeros_like(p) for n, p in self.params.items()}

    def forward(self, x, train=True):
        self.x = x if train else None
        out = self.params["weight"] @ x                        # (out,in) @ (in,B)
        out += self.params["bias"][:, None]
        return out

    def backward(self, dout):
        np.matmul(dout, self.x.T, out=self.grads["weight"])   # (out,B) @ (B,in)
        np.sum(dout, axis=1, out=self.grads["bias"])
        return self.params["weight"].T @ dout                  # (in,B)


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
    """Stable softmax cross-entropy on column logits. forward(logits (n,B), y (B,)) -> losses (B,)."""

    def forward(self, logits, y):
        z = logits - logits.max(axis=0, keepdims=True)         # shift: exp never overflows
        e = np.exp(z)
        s = e.sum(axis=0, keepdims=True)
        self.p, self.y = e / s, y                               # softmax (n,B)
        return np.log(s[0]) - z[y, np.arange(len(y))]

    def backward(self, scale):
        """Gradient of `scale * sum(losses)` w.r.t. the logits, (n,B)."""
        d = self.p * scale
        d[self.y, np.arange(len(self.y))] -= scale
        return d
