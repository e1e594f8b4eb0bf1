"""The convolutions, in the (C,H,W,B) layout of layers.py: Conv2D (im2col, optionally pool-major output),
BandedConv2D (conv2: one column per 2x2 output block) and StripConv2D (conv1: columns shared by two outputs).
Why each exists and what it was measured against: their docs and bench/README.md.
"""
from __future__ import annotations

import numpy as np

from lenet_dist.nn.layers import Layer, uniform_init, Workspace


def strided_view(a, shape, strides):
    """A read-only view of the C-contiguous array `a` with these shape and strides (in bytes), its extent
    checked against `a`; made by the ndarray constructor, several times cheaper than as_strided."""
    v = np.ndarray(shape, a.dtype, buffer=a, strides=strides)
    v.flags.writeable = False
    return v


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
    `pool_major=True` (a conv followed by the 2x2 max-pool; Ho, Wo even) orders the columns, and so the
    output, as (Cout,2,2,Ho/2,Wo/2,B): out[:, a, p, m, t] is output pixel (2m+a, 2t+p), the four members of
    every pool window in four contiguous blocks, so that MaxPool2D reads no strided data.
    """

    def __init__(self, cin, cout, k, *, stride=1, padding="valid", rng, dtype=np.float32, need_dx=True,
                 pool_major=False):
        if stride < 1 or k < 1:
            raise ValueError(f"stride and kernel size must be >= 1, got stride={stride}, k={k}")
        self.cin, self.cout, self.k, self.stride, self.padding = cin, cout, k, stride, padding
        self.need_dx, self.pool_major = need_dx, pool_major
        self.params = {"weight": uniform_init(rng, cin * k * k, (cout, cin, k, k), dtype),
                       "bias": uniform_init(rng, cin * k * k, (cout,), dtype)}
        self.grads = {n: np.zeros_like(p) for n, p in self.params.items()}
        self.ws = Workspace(dtype)

    def _geometry(self, h, w):
        (pt, pb), (pl, pr) = (_padding(self.padding, h, self.k, self.stride),
                              _padding(self.padding, w, self.k, self.stride))
        hp, wp = h + pt + pb, w + pl + pr
        ho, wo = (hp - self.k) // self.stride + 1, (wp - self.k) // self.stride + 1
        if ho < 1 or wo < 1:
            raise ValueError(f"input {h}x{w} is smaller than the {self.k}x{self.k} kernel")
        if self.pool_major and (ho % 2 or wo % 2):
            raise ValueError(f"a pool-major output needs an even size, got {ho}x{wo}")
        return pt, pl, hp, wp, ho, wo

    def _padded(self, x, pt, pl, hp, wp):
        """x itself, or x copied into the zero-bordered (C,hp,wp,B) scratch array."""
        C, H, W, B = x.shape
        if (hp, wp) == (H, W) and x.flags.c_contiguous:
            return x
        xp = self.ws.get("xp", (C, hp, wp, B), zero=True)  # the border stays zero between calls
        xp[:, pt:pt + H, pl:pl + W] = x
        return xp

    def forward(self, x, train=True):
        C, H, W, B = x.shape
        assert C == self.cin, (x.shape, self.cin)
        k, s, K = self.k, self.stride, C * self.k * self.k
        pt, pl, hp, wp, ho, wo = self._geometry(H, W)
        xp = self._padded(x, pt, pl, hp, wp)
        # im2col in one strided copy: cols[c,i,j, oh,ow, b] = xp[c, s*oh+i, s*ow+j, b] (not one block copy
        # per kernel offset: slower for conv2, docs/performance.md)
        cols = self.ws.get("cols", (K + 1, ho * wo * B), init=_ones_last_row)     # (K+1, N)
        sc, sh, sw, sb = xp.strides
        if self.pool_major:     # columns (row parity, column parity, oh//2, ow//2, b): see the class doc
            shape = (C, k, k, 2, 2, ho // 2, wo // 2, B)
            strides = (sc, sh, sw, s * sh, s * sw, 2 * s * sh, 2 * s * sw, sb)
        else:
            shape, strides = (C, k, k, ho, wo, B), (sc, sh, sw, s * sh, s * sw, sb)
        np.copyto(cols[:K].reshape(shape), strided_view(xp, shape, strides))
        wb = self.ws.get("wb", (self.cout, K + 1))                      # [weight | bias]
        wb[:, :K] = self.params["weight"].reshape(self.cout, K)
        wb[:, K] = self.params["bias"]
        out = self.ws.get("out", (self.cout, ho * wo * B))
        np.matmul(wb, cols, out=out)                                     # (Cout, N)
        self.cols, self.xshape, self.geom = cols, x.shape, (pt, pl, hp, wp, ho, wo)
        if self.pool_major:
            return out.reshape(self.cout, 2, 2, ho // 2, wo // 2, B)
        return out.reshape(self.cout, ho, wo, B)

    def backward(self, dout):
        C, H, W, B = self.xshape
        pt, pl, hp, wp, ho, wo = self.geom
        k, s, K = self.k, self.stride, C * self.k * self.k
        d2 = dout.reshape(self.cout, ho * wo * B)                        # (Cout, N), the columns' order
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
        # col2im one kernel row at a time: dcols for row i, (k*C, N) = W[:, :, i, :]^T d2, is summed back
        # by one strided add per kernel column j: a row's slice stays in cache, the whole (K, N) dcols does
        # not (docs/performance.md).
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
        return dxp[:, pt:pt + H, pl:pl + W]


class BandedConv2D(Conv2D):
    """Conv2D(stride=1, pool_major=True), the same parameters, output and gradients, computed with one
    column per 2x2 block of output pixels.

    A column holds the (k+1) x (k+1) input patch that the four outputs of a pool window read (per input
    channel); the weight matrix has one row per (output channel, row parity, column parity), with the k x k
    kernel placed at offset (0|1, 0|1) in that patch, zeros elsewhere (a band). The GEMM's rows come out
    already pool-major. For LeNet's conv2: 217 values per four outputs where im2col holds 4 x 151, a GEMM
    64 rows tall instead of 16, 42% more multiply-adds, and measured faster (bench/README.md).
    Not for conv1: OpenBLAS does not add a band's zeros without effect (the rows of one window round
    differently even for equal patches), so the exact ties of a uniform background (everywhere in conv1's
    output) would no longer be ties, and which pixel gets a window's gradient would depend on how the
    batch is cut. StripConv2D keeps them exact.
    """

    def __init__(self, cin, cout, k, *, padding="valid", rng, dtype=np.float32, need_dx=True):
        super().__init__(cin, cout, k, stride=1, padding=padding, rng=rng, dtype=dtype, need_dx=need_dx,
                         pool_major=True)

    def forward(self, x, train=True):
        C, H, W, B = x.shape
        assert C == self.cin, (x.shape, self.cin)
        k, kp, Co = self.k, self.k + 1, self.cout
        pt, pl, hp, wp, ho, wo = self._geometry(H, W)
        xp = self._padded(x, pt, pl, hp, wp)
        # cols[(c,u,v), (m,t,b)] = xp[c, 2m+u, 2t+v, b], u, v < k+1: the patch under output pixels
        # (2m..2m+1, 2t..2t+1); then a row of ones for the bias. One strided copy.
        Kb, n = C * kp * kp, ho * wo * B // 4
        cols = self.ws.get("cols", (Kb + 1, n), init=_ones_last_row)
        sc, sh, sw, sb = xp.strides
        shape = (C, kp, kp, ho // 2, wo // 2, B)
        src = strided_view(xp, shape, (sc, sh, sw, 2 * sh, 2 * sw, sb))
        np.copyto(cols[:Kb].reshape(shape), src)
        # band[(o,a,p), (c,u,v)] = weight[o, c, u-a, v-p] where both lie in [0, k); zeros off the band stay
        band = self.ws.get("band", (Co * 4, Kb + 1), zero=True)
        np.copyto(_kernels_in_band(band, Co, C, k), self.params["weight"][:, None, None])
        band[:, Kb].reshape(Co, 4)[...] = self.params["bias"][:, None]
        out = self.ws.get("out", (Co * 4, n))
        np.matmul(band, cols, out=out)                                   # (Cout*4, N/4)
        self.cols, self.band, self.xshape, self.geom = cols, band, x.shape, (pt, pl, hp, wp, ho, wo)
        return out.reshape(Co, 2, 2, ho // 2, wo // 2, B)

    def backward(self, dout):
        C, H, W, B = self.xshape
        pt, pl, hp, wp, ho, wo = self.geom
        k, kp, Co = self.k, self.k + 1, self.cout
        Kb = C * kp * kp
        d2 = dout.reshape(Co * 4, -1)                                    # (Cout*4, N/4)
        g = self.ws.get("g", (Co * 4, Kb + 1))
        np.matmul(d2, self.cols.T, out=g)                                # d band
        g5 = _kernels_in_band(g, Co, C, k)                                # each member's d weight
        dw = self.grads["weight"]
        np.add(g5[:, 0, 0], g5[:, 0, 1], out=dw)
        dw += g5[:, 1, 0]
        dw += g5[:, 1, 1]
        np.sum(g[:, Kb].reshape(Co, 4), axis=1, out=self.grads["bias"])
        if not self.need_dx:
            return None
        # dx: the patches' gradient band^T d2, (C*(k+1)^2, N/4), summed back onto the padded input
        dcols = self.ws.get("dcols", (Kb, d2.shape[1]))
        np.matmul(self.band[:, :Kb].T, d2, out=dcols)
        d6 = dcols.reshape(C, kp, kp, ho // 2, wo // 2, B)
        return col2im_pairs(d6, self.ws, (hp, wp))[:, pt:pt + H, pl:pl + W]


def _kernels_in_band(band, Co, C, k):
    """(Co, 2, 2, C, k, k) view of a band-shaped C-contiguous (Co*4, C*(k+1)^2 + 1) matrix: [o, a, p] is
    row (o, a, p)'s k x k window at offset (a, p) of each channel's (k+1) x (k+1) patch, where that
    member's kernel sits. One view instead of four slices."""
    kp, row, e = k + 1, band.shape[1], band.itemsize
    return np.ndarray((Co, 2, 2, C, k, k), band.dtype, buffer=band,
                      strides=(4 * row * e, (2 * row + kp) * e, (row + 1) * e, kp * kp * e, kp * e, e))


class StripConv2D(Conv2D):
    """Conv2D(cin=1, stride=1, pool_major=True, need_dx=False) for a first layer: the same parameters,
    output and weight gradients, from 40% smaller columns, with exact pool ties kept exact.

    One column holds the (k+1) x k strip of input under two vertically adjacent outputs (2m, 2t+p) and
    (2m+1, 2t+p), rows in (u, v) order; the columns of parity p = 0 come first, then those of p = 1. The
    k x k patch of window member (a, p) is then the row range [k*a, k*a + k*k) of parity p's columns, so
    every member is one GEMM of the same (Cout, k*k) weight matrix with a view of the columns: 30 values per two
    outputs where im2col holds 2 x 25, 40% less to write and to read back in backward, and faster than
    pool-major im2col (bench/conv1_compare.py; figures in bench/README.md). Two members whose patches are equal (a uniform background: most of MNIST) are the same
    GEMM on the same values at the same column (in the same blocks of columns), so their outputs are bit-equal and the pool's tie rule
    decides, whatever the batch size. (BandedConv2D's one taller GEMM does not give that with OpenBLAS;
    see its doc.) The bias is added to the output, as it cannot sit in a row the members share.
    """

    def __init__(self, cin, cout, k, *, padding="valid", rng, dtype=np.float32, need_dx=False):
        if cin != 1 or need_dx:
            raise ValueError("StripConv2D is for a first layer: one input channel and no input gradient")
        super().__init__(cin, cout, k, stride=1, padding=padding, rng=rng, dtype=dtype, need_dx=False,
                         pool_major=True)

    def forward(self, x, train=True):
        C, H, W, B = x.shape
        assert C == 1, x.shape
        k, kk, Co = self.k, self.k * self.k, self.cout
        pt, pl, hp, wp, ho, wo = self._geometry(H, W)
        xp = self._padded(x, pt, pl, hp, wp)
        # cols[(u,v), p, (m,t,b)] = xp[0, 2m+u, 2t+p+v, b], u < k+1, v < k: one strided copy. The strip rows
        # come first so that both parities together are one ((k+1)k, 2n) matrix for backward's one GEMM.
        n = ho * wo * B // 4
        cols = self.ws.get("cols", ((k + 1) * k, 2, n))
        _, sh, sw, sb = xp.strides
        shape = (k + 1, k, 2, ho // 2, wo // 2, B)
        src = strided_view(xp, shape, (sh, sw, sw, 2 * sh, 2 * sw, sb))
        np.copyto(cols.reshape(shape), src)
        w2 = self.params["weight"].reshape(Co, kk)
        out = self.ws.get("out", (Co, 2, 2, n))                          # (Cout, a, p, N/4)
        for p in (0, 1):                # a parity's two members read overlapping rows: one block at a time
            matmul_by_columns(w2, [(cols[k * a:k * a + kk, p], out[:, a, p]) for a in (0, 1)])
        out += self.params["bias"][:, None, None, None]
        self.cols, self.xshape, self.geom = cols, x.shape, (pt, pl, hp, wp, ho, wo)
        return out.reshape(Co, 2, 2, ho // 2, wo // 2, B)

    def backward(self, dout):
        k, kk, Co = self.k, self.k * self.k, self.cout
        n2 = self.cols.shape[1] * self.cols.shape[2]
        # One GEMM for all four members: rows (o, a) of dout against every strip row, both parities summed
        # in the inner dimension: g[(o,a), (u,v)] = sum over (p, m, t, b) of dout[o,a,p] * cols[(u,v), p].
        # Member (a, p)'s patch is strip rows [k*a, k*a + kk), so dweight[o] = g[(o,0), :kk] + g[(o,1), k:].
        d = dout.reshape(Co * 2, n2)                                     # (Cout*2, N/2)
        g = self.ws.get("g", (Co * 2, (k + 1) * k))
        matmul_by_inner(d, self.cols.reshape(-1, n2).T, g, self.ws.get("g_part", g.shape))
        g3 = g.reshape(Co, 2, (k + 1) * k)
        np.add(g3[:, 0, :kk], g3[:, 1, k:], out=self.grads["weight"].reshape(Co, kk))
        ones = self.ws.get("ones", (2 * n2,), init=lambda a: a.fill(1))
        np.matmul(dout.reshape(Co, -1), ones, out=self.grads["bias"])
        return None


# A GEMM whose left operand has a handful of rows (conv1's 6) and whose other dimension is long runs
# several times slower as one OpenBLAS call than in blocks of these sizes (docs/performance.md), likely as
# its packed panel of the long operand no longer stays in cache.
COLUMN_BLOCK = 4096
INNER_BLOCK = 1024


def matmul_by_columns(a, products, block=COLUMN_BLOCK):
    """out = a @ b for each (b, out) in `products` (every b with as many columns), computed in equal
    blocks of at most `block` columns, every product's block before the next block: b's that share
    memory then read it from cache. Each column's value is the same whatever the blocks and the order:
    only which call computes it changes."""
    n = products[0][0].shape[1]
    size = -(-n // -(-n // block))
    for lo in range(0, n, size):
        for b, out in products:
            np.matmul(a, b[:, lo:lo + size], out=out[:, lo:lo + size])


def matmul_by_inner(a, b, out, part, block=INNER_BLOCK):
    """out = a @ b with a long inner dimension, as the sum of the products of blocks of it, in order;
    `part` is scratch of out's shape."""
    K = a.shape[1]
    size = -(-K // -(-K // block))
    np.matmul(a[:, :size], b[:size], out=out)
    for lo in range(size, K, size):
        out += np.matmul(a[:, lo:lo + size], b[lo:lo + size], out=part)
    return out


def col2im_pairs(d6, ws, size):
    """The padded input's gradient (C, >= hp, >= wp, B) from the patches' d6 (C, kp, kp, M, T, B): input
    pixel (2m+u, 2t+v) gets d6[:, u, v, m, t], summed over (u, v) in row-major order, from zero.

    Summed in a parity-split scratch (C, row parity, column parity, hp/2, wp/2, B), where the offsets
    (2i+a, 2j+b) for a, b in {0, 1} land on four disjoint blocks of one view, each row a contiguous run of
    T*B floats: one add per (i, j), not per (u, v), and no strided run of B floats (strided binary ufuncs
    are several times slower than contiguous ones). Every pixel gets its terms in the same order as one
    add per (u, v) would give them, so the sums are the same bits. One interleaving copy then gives the
    (C, H, W, B) layout."""
    C, kp, _, M, T, B = d6.shape
    hh, hw = -(-size[0] // 2), -(-size[1] // 2)
    acc = ws.get("dx_pairs", (C, 2, 2, hh, hw, B))
    acc.fill(0)
    for i in range(-(-kp // 2)):
        for j in range(-(-kp // 2)):
            src = d6[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2]                # (C, a, b, M, T, B)
            dst = acc[:, :src.shape[1], :src.shape[2], i:i + M, j:j + T]
            np.add(dst, src, out=dst)
    dxp = ws.get("dxp", (C, 2 * hh, 2 * hw, B))
    np.copyto(dxp.reshape(C, hh, 2, hw, 2, B), acc.transpose(0, 3, 1, 4, 2, 5))
    return dxp


def _ones_last_row(a):
    a[-1] = 1
