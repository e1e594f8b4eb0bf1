"""Every layer's backward against central differences (float64, tiny shapes, seeded rng), and the vectorized
Conv2D / MaxPool2D against slow loop versions written here in the obvious (B,C,H,W) way.

Layout reminder: the layers see activations as (C,H,W,B), batch last; Dense takes (features, B).
"""
import itertools

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

try:                    # tests/ as a package (tests/__init__.py) or as a plain directory on sys.path
    from tests.gradcheck import numerical_gradient, rel_error
except ImportError:
    from gradcheck import numerical_gradient, rel_error
from lenet_dist.nn.conv import BandedConv2D, Conv2D, StripConv2D
from lenet_dist.nn.layers import Dense, Flatten, MaxPool2D, ReLU, SoftmaxCrossEntropy

TOL = 1e-6          # on the max relative error; typical values are 1e-9 .. 1e-11


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    # Tiny matrices: with two BLAS threads on a busy 2-core machine these tests ran 20x slower.
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def rng_for(*key):
    return np.random.default_rng([20240, *key])


def to_layer(a_bchw):
    """(B,C,H,W) -> the layers' (C,H,W,B), as a contiguous array."""
    return np.ascontiguousarray(a_bchw.transpose(1, 2, 3, 0))


def to_bchw(a_chwb):
    return np.ascontiguousarray(np.asarray(a_chwb).transpose(3, 0, 1, 2))


def away_from_zero(rng, shape, lo=0.1, hi=1.0):
    """Random values with |v| in [lo, hi]: no ReLU kink within any finite-difference step."""
    return rng.uniform(lo, hi, size=shape) * rng.choice([-1.0, 1.0], size=shape)


def distinct(rng, shape, gap=0.05):
    """Values that are all different by at least `gap`: no max-pool tie within any finite-difference step."""
    n = int(np.prod(shape))
    return (rng.permutation(n) * gap - n * gap / 2).reshape(shape)


# ---------------------------------------------------------------------------------- slow references

def ref_padding(padding, size, k, stride):
    """(low, high) padding, written out independently: TensorFlow's SAME rule, or an int on both sides."""
    if padding == "valid":
        return 0, 0
    if padding == "same":
        out = (size + stride - 1) // stride
        total = max((out - 1) * stride + k - size, 0)
        return total // 2, total - total // 2
    return padding, padding


def ref_conv_forward(x, w, b, stride, padding):
    """Direct convolution, loop by loop. x (B,Cin,H,W), w (Cout,Cin,k,k), b (Cout,) -> (B,Cout,Ho,Wo) float64."""
    B, Cin, H, W = x.shape
    Cout, _, k, _ = w.shape
    (pt, pb), (pl, pr) = ref_padding(padding, H, k, stride), ref_padding(padding, W, k, stride)
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    Ho, Wo = (H + pt + pb - k) // stride + 1, (W + pl + pr - k) // stride + 1
    xl, wl, bl = xp.tolist(), w.astype(np.float64).tolist(), b.astype(np.float64).tolist()
    out = np.zeros((B, Cout, Ho, Wo))
    for n in range(B):
        for co in range(Cout):
            for oh in range(Ho):
                for ow in range(Wo):
                    s = bl[co]
                    for ci in range(Cin):
                        for i in range(k):
                            for j in range(k):
                                s += xl[n][ci][oh * stride + i][ow * stride + j] * wl[co][ci][i][j]
                    out[n, co, oh, ow] = s
    return out


def ref_conv_backward(x, w, dout, stride, padding):
    """Loop version of the gradients: (dx (B,Cin,H,W), dw, db) in float64."""
    B, Cin, H, W = x.shape
    Cout, _, k, _ = w.shape
    (pt, pb), (pl, pr) = ref_padding(padding, H, k, stride), ref_padding(padding, W, k, stride)
    xl = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr))).tolist()
    wl = w.astype(np.float64).tolist()
    dl = dout.astype(np.float64).tolist()
    _, _, Ho, Wo = dout.shape
    dxp = np.zeros((B, Cin, H + pt + pb, W + pl + pr))
    dw = np.zeros(w.shape)
    db = np.zeros(Cout)
    for n in range(B):
        for co in range(Cout):
            for oh in range(Ho):
                for ow in range(Wo):
                    g = dl[n][co][oh][ow]
                    db[co] += g
                    for ci in range(Cin):
                        for i in range(k):
                            for j in range(k):
                                r, c = oh * stride + i, ow * stride + j
                                dw[co, ci, i, j] += g * xl[n][ci][r][c]
                                dxp[n, ci, r, c] += g * wl[co][ci][i][j]
    return dxp[:, :, pt:pt + H, pl:pl + W], dw, db


def ref_pool(x):
    """2x2/2 max-pool by loops on (B,C,H,W). Returns (out, argmax offsets (di, dj)): the FIRST maximum in
    window order top-left, top-right, bottom-left, bottom-right."""
    B, C, H, W = x.shape
    out = np.zeros((B, C, H // 2, W // 2), x.dtype)
    arg = np.zeros((B, C, H // 2, W // 2, 2), int)
    for n in range(B):
        for c in range(C):
            for i in range(H // 2):
                for j in range(W // 2):
                    best, where = None, None
                    for di, dj in ((0, 0), (0, 1), (1, 0), (1, 1)):
                        v = x[n, c, 2 * i + di, 2 * j + dj]
                        if best is None or v > best:
                            best, where = v, (di, dj)
                    out[n, c, i, j], arg[n, c, i, j] = best, where
    return out, arg


def ref_pool_backward(x_shape, arg, dout):
    dx = np.zeros(x_shape, dout.dtype)
    B, C, Ho, Wo = dout.shape
    for n in range(B):
        for c in range(C):
            for i in range(Ho):
                for j in range(Wo):
                    di, dj = arg[n, c, i, j]
                    dx[n, c, 2 * i + di, 2 * j + dj] += dout[n, c, i, j]
    return dx


# ------------------------------------------------------------------------------------------- Conv2D

# (cin, cout, k, stride, padding, H, W, B)
CONV_CASES = [
    (1, 2, 3, 1, "valid", 5, 5, 2),
    (2, 3, 3, 1, "same", 5, 6, 2),
    (3, 2, 3, 1, 1, 4, 5, 3),        # integer padding
    (2, 2, 3, 2, "valid", 7, 6, 2),  # stride 2; the last column of W=6 is never read
    (2, 3, 3, 2, "same", 6, 5, 2),   # stride 2 SAME: asymmetric padding
    (3, 4, 2, 1, 2, 4, 4, 1),        # even kernel, padding wider than needed, batch of one
    (2, 2, 5, 1, 2, 6, 6, 2),        # LeNet's conv1 geometry
    (1, 1, 1, 1, "valid", 3, 3, 2),  # 1x1
]
CONV_IDS = [f"cin{c[0]}-cout{c[1]}-k{c[2]}-s{c[3]}-{c[4]}-{c[5]}x{c[6]}-B{c[7]}" for c in CONV_CASES]


def make_conv(case, dtype, key, need_dx=True):
    cin, cout, k, stride, padding, H, W, B = case
    rng = rng_for(1, key)
    conv = Conv2D(cin, cout, k, stride=stride, padding=padding, rng=rng, dtype=dtype, need_dx=need_dx)
    conv.params["bias"][...] = rng.normal(size=cout)       # zero by default: make it matter
    x = rng.normal(size=(cin, H, W, B)).astype(dtype)
    return conv, x, rng


@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv_gradients_match_central_differences(case):
    conv, x, rng = make_conv(case, np.float64, 0)
    out = conv.forward(x)
    dout = rng.normal(size=out.shape)
    dx = np.array(conv.backward(dout))              # copies: the layer reuses its buffers
    dw, db = conv.grads["weight"].copy(), conv.grads["bias"].copy()
    assert dx.shape == x.shape and dw.shape == conv.params["weight"].shape

    f = lambda _: float(np.sum(conv.forward(x) * dout))  # noqa: E731
    assert rel_error(dx, numerical_gradient(f, x)) < TOL
    assert rel_error(dw, numerical_gradient(f, conv.params["weight"])) < TOL
    assert rel_error(db, numerical_gradient(f, conv.params["bias"])) < TOL


@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv_output_shape(case):
    cin, cout, k, stride, padding, H, W, B = case
    conv, x, _ = make_conv(case, np.float64, 1)
    (pt, pb), (pl, pr) = ref_padding(padding, H, k, stride), ref_padding(padding, W, k, stride)
    expect = (cout, (H + pt + pb - k) // stride + 1, (W + pl + pr - k) // stride + 1, B)
    assert conv.forward(x).shape == expect
    if padding == "same":
        assert expect[1:3] == (-(-H // stride), -(-W // stride))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv_matches_loop_reference(case, dtype):
    cin, cout, k, stride, padding, H, W, B = case
    conv, _, rng = make_conv(case, dtype, 2)
    w, b = conv.params["weight"], conv.params["bias"]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    # Two batch sizes, then the first again: scratch buffers reused across shapes must not leak values.
    for nb in (B, B + 2, B):
        x_bchw = rng.normal(size=(nb, cin, H, W)).astype(dtype)
        out = conv.forward(to_layer(x_bchw))
        assert out.dtype == dtype
        np.testing.assert_allclose(to_bchw(out), ref_conv_forward(x_bchw, w, b, stride, padding), **tol)
        dout_bchw = rng.normal(size=to_bchw(out).shape).astype(dtype)
        dx = conv.backward(to_layer(dout_bchw))
        rdx, rdw, rdb = ref_conv_backward(x_bchw, w, dout_bchw, stride, padding)
        assert dx.dtype == dtype and conv.grads["weight"].dtype == dtype and conv.grads["bias"].dtype == dtype
        np.testing.assert_allclose(to_bchw(dx), rdx, **tol)
        np.testing.assert_allclose(conv.grads["weight"], rdw, **tol)
        np.testing.assert_allclose(conv.grads["bias"], rdb, **tol)


def test_conv_non_contiguous_input():
    # LeNet5 hands conv1 a transposed view; an unpadded conv must copy such an input, not misread it.
    case = (2, 3, 3, 1, "valid", 5, 5, 3)
    conv, _, rng = make_conv(case, np.float64, 3)
    x_bchw = rng.normal(size=(3, 2, 5, 5))
    view = x_bchw.transpose(1, 2, 3, 0)
    assert not view.flags.c_contiguous
    np.testing.assert_allclose(to_bchw(conv.forward(view)),
                               ref_conv_forward(x_bchw, conv.params["weight"], conv.params["bias"], 1, "valid"),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padding", ["valid", 2])
def test_conv_need_dx_false(padding):
    case = (2, 3, 5, 1, padding, 6, 6, 2)
    a, x, rng = make_conv(case, np.float64, 4, need_dx=False)
    b, _, _ = make_conv(case, np.float64, 4, need_dx=True)
    np.testing.assert_array_equal(a.params["weight"], b.params["weight"])
    out = a.forward(x)
    np.testing.assert_array_equal(out, b.forward(x))
    dout = rng.normal(size=out.shape)
    assert a.backward(dout) is None
    assert b.backward(dout) is not None
    np.testing.assert_allclose(a.grads["weight"], b.grads["weight"], rtol=1e-13)
    np.testing.assert_allclose(a.grads["bias"], b.grads["bias"], rtol=1e-13)
    f = lambda _: float(np.sum(a.forward(x) * dout))  # noqa: E731
    dw = a.grads["weight"].copy()
    assert rel_error(dw, numerical_gradient(f, a.params["weight"])) < TOL


def test_conv_rejects_bad_geometry():
    rng = rng_for(5)
    with pytest.raises(ValueError, match="padding"):
        Conv2D(1, 1, 3, padding="full", rng=rng).forward(np.zeros((1, 5, 5, 1), np.float32))
    with pytest.raises(ValueError, match="stride"):
        Conv2D(1, 1, 3, stride=0, rng=rng)
    with pytest.raises(ValueError, match="smaller"):
        Conv2D(1, 1, 5, rng=rng).forward(np.zeros((1, 3, 3, 1), np.float32))


# ---------------------------------------------------------------------------------------- MaxPool2D

def test_maxpool_gradient_matches_central_differences():
    rng = rng_for(10)
    pool = MaxPool2D(np.float64)
    x = distinct(rng, (2, 4, 6, 3))
    out = pool.forward(x)
    dout = rng.normal(size=out.shape)
    dx = np.array(pool.backward(dout))
    f = lambda _: float(np.sum(pool.forward(x) * dout))  # noqa: E731
    assert rel_error(dx, numerical_gradient(f, x)) < TOL


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_maxpool_matches_loop_reference(dtype):
    rng = rng_for(11)
    pool = MaxPool2D(dtype)
    for B in (3, 1, 3):                                      # reused buffers across batch sizes
        # small integers: plenty of ties, which the reference breaks by window order
        x_bchw = rng.integers(0, 3, size=(B, 2, 6, 4)).astype(dtype)
        out = pool.forward(to_layer(x_bchw))
        ref, arg = ref_pool(x_bchw)
        assert out.dtype == dtype
        np.testing.assert_array_equal(to_bchw(out), ref)
        dout_bchw = rng.normal(size=ref.shape).astype(dtype)
        dx = pool.backward(to_layer(dout_bchw))
        assert dx.dtype == dtype
        np.testing.assert_array_equal(to_bchw(dx), ref_pool_backward(x_bchw.shape, arg, dout_bchw))


def test_maxpool_ties_go_to_first_maximum_in_window_order():
    # Every 2x2 window over {0,1,2}: 81 windows side by side, including constant ones.
    patterns = list(itertools.product([0.0, 1.0, 2.0], repeat=4))     # (tl, tr, bl, br)
    n = len(patterns)
    x = np.zeros((1, 2, 2 * n, 1))
    for w, (tl, tr, bl, br) in enumerate(patterns):
        x[0, :, 2 * w:2 * w + 2, 0] = [[tl, tr], [bl, br]]
    pool = MaxPool2D(np.float64)
    out = pool.forward(x)
    dout = np.arange(1.0, n + 1).reshape(1, 1, n, 1)
    dx = pool.backward(dout)
    for w, p in enumerate(patterns):
        first = int(np.argmax(p))                 # np.argmax returns the first maximum
        expect = np.zeros(4)
        expect[first] = dout[0, 0, w, 0]
        assert out[0, 0, w, 0] == max(p)
        np.testing.assert_array_equal(dx[0, :, 2 * w:2 * w + 2, 0].ravel(), expect, err_msg=f"window {p}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_maxpool_constant_windows_send_gradient_to_top_left(dtype):
    x = np.full((3, 4, 4, 2), 0.5, dtype)
    pool = MaxPool2D(dtype)
    out = pool.forward(x)
    dout = np.ones(out.shape, dtype)
    dx = pool.backward(dout)
    expect = np.zeros(x.shape, dtype)
    expect[:, 0::2, 0::2, :] = 1.0
    np.testing.assert_array_equal(dx, expect)
    assert dx.sum() == dout.sum()                  # the whole gradient, exactly once per window


def test_maxpool_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even"):
        MaxPool2D(np.float32).forward(np.zeros((1, 5, 4, 1), np.float32))


# --------------------------------------------------------------------------------------------- ReLU

def test_relu_gradient_matches_central_differences():
    rng = rng_for(20)
    relu = ReLU()
    x = away_from_zero(rng, (3, 4, 4, 2))
    out = relu.forward(x)
    np.testing.assert_array_equal(out, np.where(x > 0, x, 0.0))
    dout = rng.normal(size=out.shape)
    dx = np.array(relu.backward(dout))
    np.testing.assert_array_equal(dx, np.where(x > 0, dout, 0.0))
    f = lambda _: float(np.sum(relu.forward(x) * dout))  # noqa: E731
    assert rel_error(dx, numerical_gradient(f, x)) < TOL


# -------------------------------------------------------------------------------------------- Dense

@pytest.mark.parametrize("nin,nout,B", [(5, 3, 4), (1, 2, 1), (7, 7, 2)])
def test_dense_gradients_match_central_differences(nin, nout, B):
    rng = rng_for(30, nin)
    fc = Dense(nin, nout, rng=rng, dtype=np.float64)
    fc.params["bias"][...] = rng.normal(size=nout)
    x = rng.normal(size=(nin, B))
    out = fc.forward(x)
    np.testing.assert_allclose(out, fc.params["weight"] @ x + fc.params["bias"][:, None], rtol=1e-13)
    dout = rng.normal(size=out.shape)
    dx = np.array(fc.backward(dout))
    dw, db = fc.grads["weight"].copy(), fc.grads["bias"].copy()
    f = lambda _: float(np.sum(fc.forward(x) * dout))  # noqa: E731
    assert rel_error(dx, numerical_gradient(f, x)) < TOL
    assert rel_error(dw, numerical_gradient(f, fc.params["weight"])) < TOL
    assert rel_error(db, numerical_gradient(f, fc.params["bias"])) < TOL


# ------------------------------------------------------------------------------------------ Flatten

def test_flatten_feature_order_is_pytorch_chw():
    rng = rng_for(40)
    a = rng.normal(size=(3, 2, 4, 5))                 # (B,C,H,W), as PyTorch holds it
    flat = Flatten().forward(to_layer(a))
    np.testing.assert_array_equal(flat, a.reshape(3, -1).T)   # torch.flatten(a, 1), one column per example
    # and element by element, feature index = (c*H + h)*W + w
    for b, c, h, w in [(0, 0, 0, 0), (1, 1, 2, 3), (2, 0, 3, 4), (2, 1, 0, 1)]:
        assert flat[(c * 4 + h) * 5 + w, b] == a[b, c, h, w]


def test_flatten_gradient():
    rng = rng_for(41)
    fl = Flatten()
    x = rng.normal(size=(2, 3, 2, 4))
    out = fl.forward(x)
    assert out.shape == (12, 4)
    dout = rng.normal(size=out.shape)
    dx = np.array(fl.backward(dout))
    assert dx.shape == x.shape
    f = lambda _: float(np.sum(fl.forward(x) * dout))  # noqa: E731
    assert rel_error(dx, numerical_gradient(f, x)) < TOL


# ------------------------------------------------------------------------------- SoftmaxCrossEntropy

def ref_losses(logits, y):
    """Cross-entropy column by column, in float64, the textbook way (after a shift, for range)."""
    out = []
    for b in range(logits.shape[1]):
        z = logits[:, b].astype(np.float64)
        z = z - z.max()
        out.append(np.log(np.exp(z).sum()) - z[y[b]])
    return np.array(out)


@pytest.mark.parametrize("scale", [1.0, 0.37, -2.0])
def test_softmax_ce_gradient_matches_central_differences(scale):
    rng = rng_for(50)
    ce = SoftmaxCrossEntropy()
    # unit-scale logits: no probability so small that the loss's rounding noise swamps its derivative
    logits = rng.normal(size=(10, 5))
    y = rng.integers(0, 10, size=5)
    losses = ce.forward(logits, y)
    np.testing.assert_allclose(losses, ref_losses(logits, y), rtol=1e-13)
    d = np.array(ce.backward(scale))
    f = lambda z: scale * float(np.sum(ce.forward(z, y)))  # noqa: E731
    assert rel_error(d, numerical_gradient(f, logits)) < TOL
    # and the closed form: scale * (softmax - onehot)
    p = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)
    p[y, np.arange(5)] -= 1
    np.testing.assert_allclose(d, scale * p, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("eps,scale", [(0.1, 1.0), (0.05, -0.37), (0.5, 2.0)])
def test_label_smoothing_loss_and_gradient_match_the_definition_and_central_differences(eps, scale):
    rng = rng_for(53)
    ce = SoftmaxCrossEntropy(eps)
    logits = rng.normal(size=(10, 6))
    y = rng.integers(0, 10, size=6)
    # the definition: cross-entropy against the target 1 - eps on the label plus eps/n everywhere
    target = np.full((10, 6), eps / 10)
    target[y, np.arange(6)] += 1 - eps
    logp = logits - logits.max(0) - np.log(np.exp(logits - logits.max(0)).sum(0))
    losses = ce.forward(logits, y)
    np.testing.assert_allclose(losses, -(target * logp).sum(0), rtol=1e-13)
    assert not np.allclose(losses, ref_losses(logits, y))            # not the plain loss
    d = np.array(ce.backward(scale))
    f = lambda z: scale * float(np.sum(ce.forward(z, y)))  # noqa: E731
    assert rel_error(d, numerical_gradient(f, logits)) < TOL
    np.testing.assert_allclose(d, scale * (np.exp(logp) - target), rtol=1e-12, atol=1e-15)
    # float32 in, float32 out; and no smoothing is the plain cross-entropy
    assert ce.forward(logits.astype(np.float32), y).dtype == np.float32
    assert ce.backward(np.float32(scale)).dtype == np.float32
    np.testing.assert_allclose(SoftmaxCrossEntropy(0.0).forward(logits, y), ref_losses(logits, y), rtol=1e-13)
    with pytest.raises(ValueError, match="label smoothing"):
        SoftmaxCrossEntropy(1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_ce_is_stable_for_huge_logits(dtype):
    rng = rng_for(51)
    base = rng.normal(size=(10, 4)) * 5
    y = np.array([0, 3, 9, 5])
    ce = SoftmaxCrossEntropy()
    with np.errstate(over="raise", invalid="raise", divide="raise"):   # no overflow, no NaN
        shifted = ce.forward((base + 1e4).astype(dtype), y)
        d_shifted = ce.backward(1.0)
        plain = ce.forward(base.astype(dtype), y)
        d_plain = ce.backward(1.0)
    assert shifted.dtype == dtype and d_shifted.dtype == dtype
    assert np.isfinite(shifted).all() and np.isfinite(d_shifted).all()
    tol = 1e-2 if dtype == np.float32 else 1e-9      # float32 cannot resolve base against 1e4 finer
    np.testing.assert_allclose(shifted, plain, atol=tol)
    np.testing.assert_allclose(d_shifted, d_plain, atol=tol)
    # a spread of 2e4 between logits: exact answers 0 and 2e4, not inf or nan
    spread = np.zeros((10, 2), dtype)
    spread[0, :] = 1e4
    spread[1, :] = -1e4
    with np.errstate(over="raise", invalid="raise"):
        losses = ce.forward(spread, np.array([0, 1]))
        d = ce.backward(1.0)
    np.testing.assert_allclose(losses, [0.0, 2e4], rtol=1e-6)
    assert np.isfinite(d).all()


def test_softmax_ce_float32_stays_float32():
    rng = rng_for(52)
    ce = SoftmaxCrossEntropy()
    logits = rng.normal(size=(10, 3)).astype(np.float32)
    assert ce.forward(logits, np.array([1, 2, 3])).dtype == np.float32
    assert ce.backward(np.float32(0.5)).dtype == np.float32
    assert ce.backward(0.5).dtype == np.float32


# ---------------------------------------------------------------------------------- float32 paths

def test_every_layer_keeps_float32():
    rng = rng_for(60)
    f32 = np.float32
    x = rng.normal(size=(2, 8, 8, 3)).astype(f32)
    for conv in (Conv2D(2, 3, 3, padding=1, rng=rng, dtype=f32), Conv2D(2, 3, 3, stride=2, rng=rng, dtype=f32)):
        out = conv.forward(x)
        assert out.dtype == f32
        dx = conv.backward(np.ones(out.shape, f32))
        assert dx.dtype == f32
        assert all(g.dtype == f32 for g in conv.grads.values())
        assert all(p.dtype == f32 for p in conv.params.values())
    for layer in (MaxPool2D(f32), ReLU(), Flatten()):
        out = layer.forward(x)
        assert out.dtype == f32, type(layer).__name__
        assert layer.backward(np.ones(out.shape, f32)).dtype == f32, type(layer).__name__
    fc = Dense(5, 4, rng=rng, dtype=f32)
    out = fc.forward(rng.normal(size=(5, 3)).astype(f32))
    assert out.dtype == f32
    assert fc.backward(np.ones(out.shape, f32)).dtype == f32
    assert all(g.dtype == f32 for g in fc.grads.values())


POOL_CONVS = {
    "pool_major": lambda cin, cout, padding, rng, dtype: Conv2D(cin, cout, 5, padding=padding, rng=rng, dtype=dtype,
                                                                pool_major=True),
    "banded": lambda cin, cout, padding, rng, dtype: BandedConv2D(cin, cout, 5, padding=padding, rng=rng, dtype=dtype),
    "strip": lambda cin, cout, padding, rng, dtype: StripConv2D(cin, cout, 5, padding=padding, rng=rng, dtype=dtype),
}


GEOMETRIES = [(1, 6, 2, 8), (3, 4, "valid", 10), (1, 3, "valid", 12)]        # cin, cout, padding, H


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind,cin,cout,padding,H", [(kind, *g) for kind in sorted(POOL_CONVS) for g in GEOMETRIES
                                                     if kind != "strip" or g[0] == 1])   # strip: one channel
def test_pool_major_banded_strip_conv_then_pool_match_loop_reference(kind, cin, cout, padding, H, dtype):
    # The model's fast paths: a conv whose output is laid out for the 2x2 pool that follows it. Checked as
    # the pair (conv -> pool, and back) against the loop convolution and the loop pool.
    rng = np.random.default_rng(11)
    conv, pool = POOL_CONVS[kind](cin, cout, padding, rng, dtype), MaxPool2D(dtype)
    w, b = conv.params["weight"], conv.params["bias"]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    for nb in (3, 5, 3):
        x_bchw = rng.normal(size=(nb, cin, H, H)).astype(dtype)
        pooled = pool.forward(conv.forward(to_layer(x_bchw)))
        ref_out = ref_conv_forward(x_bchw, w, b, 1, padding)
        ref_pooled, arg = ref_pool(ref_out)
        np.testing.assert_allclose(to_bchw(pooled), ref_pooled, **tol)
        dout_bchw = rng.normal(size=ref_pooled.shape).astype(dtype)
        dx = conv.backward(pool.backward(to_layer(dout_bchw)))
        rdx, rdw, rdb = ref_conv_backward(x_bchw, w, ref_pool_backward(ref_out.shape, arg, dout_bchw), 1, padding)
        if dx is None:                                  # StripConv2D: a first layer, no input gradient
            assert kind == "strip"
        else:
            np.testing.assert_allclose(to_bchw(dx), rdx, **tol)
        np.testing.assert_allclose(conv.grads["weight"], rdw, **tol)
        np.testing.assert_allclose(conv.grads["bias"], rdb, **tol)


def test_strip_conv_gradients_match_central_differences():
    rng = rng_for(70)
    conv, pool = StripConv2D(1, 2, 3, padding=1, rng=rng, dtype=np.float64), MaxPool2D(np.float64, relu=True)
    x = rng.normal(size=(1, 6, 6, 2))
    dout = rng.normal(size=(2, 3, 3, 2))

    def loss(_=None):
        return float((pool.forward(conv.forward(x)) * dout).sum())

    loss()
    assert conv.backward(pool.backward(dout)) is None
    for name in ("weight", "bias"):
        num = numerical_gradient(loss, conv.params[name])
        assert rel_error(conv.grads[name], num) < 1e-7, name


def test_strip_conv_rejects_what_it_is_not_for():
    rng = rng_for(71)
    with pytest.raises(ValueError, match="one input channel"):
        StripConv2D(2, 3, 5, rng=rng)
    with pytest.raises(ValueError, match="no input gradient"):
        StripConv2D(1, 3, 5, rng=rng, need_dx=True)


@pytest.mark.parametrize("batch", [1, 7, 16, 50, 128])
def test_strip_conv_equal_patches_give_bit_equal_outputs(batch):
    # MNIST is mostly a uniform background: the four members of a window then see equal patches, their
    # outputs must tie exactly (not within rounding) for the pool's tie rule to decide, at any batch size,
    # or which pixel gets the gradient would depend on how the batch is cut across ranks.
    rng = rng_for(72, batch)
    levels = np.array([-0.4242, 0.0, 1.1, 2.8215], np.float32)
    x = np.repeat(np.repeat(rng.choice(levels, size=(1, 7, 7, batch)), 4, axis=1), 4, axis=2)   # 4x4 blocks
    conv = StripConv2D(1, 6, 5, padding=2, rng=rng, dtype=np.float32)
    out = conv.forward(np.ascontiguousarray(x, np.float32))           # (6,2,2,14,14,B)
    xp = np.pad(x[0], ((2, 2), (2, 2), (0, 0)))
    equal = 0
    for m in range(14):
        for t in range(14):
            patch = [xp[2 * m + a:2 * m + a + 5, 2 * t + p:2 * t + p + 5] for a in (0, 1) for p in (0, 1)]
            for i in range(1, 4):
                same = (patch[i] == patch[0]).all(axis=(0, 1))           # (B,) member i's patch equals member 0's
                np.testing.assert_array_equal(out[:, i // 2, i % 2, m, t][:, same], out[:, 0, 0, m, t][:, same])
                equal += int(same.sum())
    assert equal > 30 * batch                      # the test saw plenty of equal patches (about 40 per image)


def test_workspace_one_buffer_per_name_and_fresh_init_on_a_new_shape():
    from lenet_dist.nn.layers import Workspace
    ws = Workspace(np.float32)
    a = ws.get("xp", (2, 3, 8), zero=True)
    a[...] = 5
    assert ws.get("xp", (2, 3, 8), zero=True)[0, 0, 0] == 5          # same shape: left as it was
    b = ws.get("xp", (2, 3, 4), zero=True)                              # smaller: a view of the same memory
    assert np.shares_memory(a, b) and b.flags.c_contiguous and not b.any()
    c = ws.get("ones", (3, 5), init=lambda x: x.fill(1))
    c[...] = 7
    assert (ws.get("ones", (5, 3), init=lambda x: x.fill(1)) == 1).all()  # same size, new shape: init again
    d = ws.get("xp", (4, 3, 8), zero=True)                              # larger: a new buffer
    assert d.shape == (4, 3, 8) and not d.any()
    assert ws.get("m", (4,), dtype=bool).dtype == np.bool_


def test_changing_batch_sizes_give_the_same_gradients_as_fresh_layers():
    # Workspace buffers reused across batch sizes (training shard, eval batch, --balance moving the cut)
    # must not leak one size's contents into another's result.
    from lenet_dist.nn.model import LeNet5
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 40)
    used = LeNet5(seed=1)
    for B in (40, 8, 24, 40, 16):
        fresh = LeNet5(seed=1)
        fresh.loss_and_grad(x[:B], y[:B], 1.0)
        used.loss_and_grad(x[:B], y[:B], 1.0)
        assert np.array_equal(used.grads, fresh.grads)
        assert np.array_equal(used.forward(x[:B]), fresh.forward(x[:B]))
