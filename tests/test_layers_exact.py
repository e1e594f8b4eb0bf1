"""The step's faster code paths against the plain ones they replace, bit for bit (float32 and float64).

Each reference below is the obvious version of the same float operations in the same order; the fast
path may move, group or fuse them, but every value must come out with the same bits (signed zeros
included), so that training trajectories do not move. Compared as integer views, not with ==.
"""
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from lenet_dist.nn.conv import COLUMN_BLOCK, BandedConv2D, StripConv2D, col2im_pairs
from lenet_dist.nn.layers import MaxPool2D, ScratchArena, Workspace
from lenet_dist.nn.model import LeNet5
from lenet_dist.nn.optim import SGD


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view({4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_same_bits(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert np.array_equal(bits(a), bits(b)), f"{np.count_nonzero(bits(a) != bits(b))} values differ"


def with_signed_zeros(rng, shape, dtype):
    a = rng.standard_normal(shape).astype(dtype)
    a[rng.random(shape) < 0.2] = -0.0
    a[rng.random(shape) < 0.1] = 0.0
    return a


def ref_col2im(d6, hp, wp):
    """One strided add per kernel offset (u, v), in row-major order, onto zeros."""
    C, kp, _, M, T, B = d6.shape
    dxp = np.zeros((C, hp, wp, B), d6.dtype)
    for u in range(kp):
        for v in range(kp):
            dxp[:, u:u + 2 * M:2, v:v + 2 * T:2] += d6[:, u, v]
    return dxp


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C,kp,M,T,B", [(6, 6, 5, 5, 64), (2, 5, 3, 4, 3), (1, 4, 1, 2, 1), (3, 3, 2, 2, 5)])
def test_col2im_pairs_gives_the_bits_of_one_add_per_offset(C, kp, M, T, B, dtype):
    rng = np.random.default_rng([C, kp, M, T, B])
    d6 = with_signed_zeros(rng, (C, kp, kp, M, T, B), dtype)
    hp, wp = 2 * M + kp - 2, 2 * T + kp - 2              # the padded input's size for these outputs
    ws = Workspace(dtype)
    for _ in range(2):                                   # a reused scratch gives the same result
        got = col2im_pairs(d6, ws, (hp, wp))
        assert_same_bits(got[:, :hp, :wp], ref_col2im(d6, hp, wp))
        assert not got[:, hp:].any() and not got[:, :, wp:].any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k,padding,H,B", [(5, "valid", 14, 64), (5, "valid", 14, 3), (3, 1, 8, 2), (4, "same", 6, 2)])
def test_banded_conv_input_gradient_is_the_plain_col2im_of_its_patches(k, padding, H, B, dtype):
    rng = np.random.default_rng([k, H, B])
    conv = BandedConv2D(3, 4, k, padding=padding, rng=rng, dtype=dtype)
    x = rng.standard_normal((3, H, H, B)).astype(dtype)
    out = conv.forward(x)
    dout = with_signed_zeros(rng, out.shape, dtype)
    dx = conv.backward(dout).copy()
    pt, pl, hp, wp, ho, wo = conv.geom
    Kb = 3 * (k + 1) ** 2
    dcols = np.matmul(conv.band[:, :Kb].T, dout.reshape(conv.cout * 4, -1))
    ref = ref_col2im(dcols.reshape(3, k + 1, k + 1, ho // 2, wo // 2, B), hp, wp)
    assert_same_bits(dx, ref[:, pt:pt + H, pl:pl + H])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k,padding,H,B", [(5, "valid", 14, 64), (3, 1, 8, 2), (4, "same", 6, 3)])
def test_banded_conv_band_and_weight_gradient_are_the_four_slices_of_the_plain_version(k, padding, H, B, dtype):
    rng = np.random.default_rng([k, H, B, 1])
    C, Co, kp = 3, 4, k + 1
    conv = BandedConv2D(C, Co, k, padding=padding, rng=rng, dtype=dtype)
    out = conv.forward(rng.standard_normal((C, H, H, B)).astype(dtype))
    band = np.zeros((Co * 4, C * kp * kp + 1), dtype)
    b6 = band[:, :-1].reshape(Co, 2, 2, C, kp, kp)
    for a in (0, 1):
        for p in (0, 1):
            b6[:, a, p, :, a:a + k, p:p + k] = conv.params["weight"]
    band[:, -1] = np.repeat(conv.params["bias"], 4)
    assert_same_bits(conv.band, band)
    conv.backward(with_signed_zeros(rng, out.shape, dtype))
    g6 = conv.ws.get("g", band.shape)[:, :-1].reshape(Co, 2, 2, C, kp, kp)
    dw = g6[:, 0, 0, :, :k, :k] + g6[:, 0, 1, :, :k, 1:]
    dw += g6[:, 1, 0, :, 1:, :k]
    dw += g6[:, 1, 1, :, 1:, 1:]
    assert_same_bits(conv.grads["weight"], dw)


@pytest.mark.parametrize("B", [64, 3, 200])
def test_strip_conv_output_is_each_members_blocked_product_plus_bias(B):
    rng = np.random.default_rng([B, 2])
    conv = StripConv2D(1, 6, 5, padding=2, rng=rng)
    got = conv.forward(rng.standard_normal((1, 28, 28, B)).astype(np.float32)).copy()
    w2, cols, n = conv.params["weight"].reshape(6, 25), conv.cols, conv.cols.shape[2]
    size = -(-n // -(-n // COLUMN_BLOCK))
    ref = np.empty((6, 2, 2, n), np.float32)
    for a in (0, 1):                                   # member by member, block by block
        for p in (0, 1):
            for lo in range(0, n, size):
                np.matmul(w2, cols[5 * a:5 * a + 25, p, lo:lo + size], out=ref[:, a, p, lo:lo + size])
    ref += conv.params["bias"][:, None, None, None]
    assert_same_bits(got, ref.reshape(got.shape))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [True, False])
def test_maxpool_channel_by_channel_gives_the_bits_of_whole_tensor_passes(relu, dtype):
    rng = np.random.default_rng([3, relu])
    x = rng.standard_normal((3, 2, 2, 4, 5, 6)).astype(dtype)
    x[rng.random(x.shape) < 0.3] = 0.25                  # ties inside windows
    dout = with_signed_zeros(rng, (3, 4, 5, 6), dtype)
    whole, parts = MaxPool2D(dtype, relu=relu), MaxPool2D(dtype, relu=relu)
    parts.CHANNEL_PARTS_FROM = 1
    assert len(parts._parts(x)) == 3 and len(whole._parts(x)) == 1
    for _ in range(2):
        assert_same_bits(parts.forward(x).copy(), whole.forward(x).copy())
        assert_same_bits(parts.backward(dout).copy(), whole.backward(dout).copy())
        assert_same_bits(parts.forward(x, train=False).copy(), whole.forward(x, train=False).copy())


def ref_sgd(w, v, grads, lr, momentum, nesterov, weight_decay):
    g = w * weight_decay
    g += grads
    v *= momentum
    v += g
    if nesterov:
        g += momentum * v
        w -= lr * g
    else:
        w -= lr * v


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nesterov,weight_decay", [(True, 2e-3), (False, 0.0), (False, 5e-4)])
def test_sgd_without_temporaries_gives_the_bits_of_the_plain_update(nesterov, weight_decay, dtype):
    rng = np.random.default_rng(11)
    w = rng.standard_normal(1000).astype(dtype)
    opt = SGD(w.copy(), momentum=0.9, nesterov=nesterov, weight_decay=weight_decay)
    w_ref, v_ref = w.copy(), np.zeros_like(w)
    for step in range(5):
        grads = with_signed_zeros(rng, w.shape, dtype)
        lr = 0.05 / (step + 1)
        opt.step(grads, lr, slice(0, 400))
        opt.step(grads, lr, slice(400, None))
        ref_sgd(w_ref, v_ref, grads, lr, 0.9, nesterov, weight_decay)
        assert_same_bits(opt.params, w_ref)
        assert_same_bits(opt.velocity, v_ref)


def test_workspace_hands_back_the_same_array_until_the_shape_or_dtype_changes():
    ws = Workspace(np.float32)
    a = ws.get("g", (4, 5), zero=True)
    a[...] = 3
    b = ws.get("g", (4, 5), zero=True)
    assert b is a and (b == 3).all()
    c = ws.get("g", (4, 5), dtype=np.float64, zero=True)
    assert c.dtype == np.float64 and not c.any()
    d = ws.get("g", (2, 10), zero=True)
    assert d.shape == (2, 10) and d.dtype == np.float32 and not d.any()


def test_an_arena_backed_workspace_zeroes_and_initializes_at_every_call():
    """Another process writes the arena between two calls: what `zero` and `init` promise holds anyway,
    and an array that does not fit stays the workspace's own."""
    arena = ScratchArena(np.zeros(3 * 4096, np.uint8))
    ws = Workspace(np.float32)
    ws.arena, arena.active = arena, True
    a = ws.get("a", (4, 5), zero=True)
    assert a.ctypes.data % 4096 == 0 and np.shares_memory(a, arena.mem)
    b = ws.get("b", (3,), init=lambda x: x.fill(7))
    arena.mem[:] = 0xFF                                          # the other rank's turn
    assert not ws.get("a", (4, 5), zero=True).any() and (ws.get("b", (3,), init=lambda x: x.fill(7)) == 7).all()
    big = ws.get("big", (4096,))                                 # 16 KiB: more than is left
    assert not np.shares_memory(big, arena.mem) and arena.used <= len(arena.mem)
    arena.active = False                                         # evaluation: the workspace's own arrays
    own = ws.get("a", (4, 5), zero=True)
    assert not np.shares_memory(own, arena.mem)
    assert ws.nbytes == own.nbytes + big.nbytes


@pytest.mark.parametrize("sizes", [[(16, 16), (16, 16), (16, 16)], [(16, 9), (5, 16), (16, 3), (1, 16)]])
def test_two_models_taking_turns_in_one_arena_compute_what_each_computes_alone(sizes):
    """Two LeNet-5s (other weights, other shards, so other shapes and allocation orders) whose layers take
    turns in one arena, as the ranks of one place in turns.py do: every gradient is bit-identical to the same
    model's on its own scratch."""
    rng = np.random.default_rng(1)
    arena = ScratchArena(np.zeros(64 << 20, np.uint8))
    shared, alone = [LeNet5(seed=s) for s in (0, 1)], [LeNet5(seed=s) for s in (0, 1)]
    for m in shared:
        for ws in m.workspaces():
            ws.arena = arena
    for turn in sizes:
        for m_shared, m_alone, b in zip(shared, alone, turn):
            x = rng.standard_normal((b, 28, 28)).astype(np.float32)
            y = rng.integers(0, 10, b)
            arena.active = True
            got = m_shared.loss_and_grad(x, y, 1.0)
            arena.active = False
            assert got == m_alone.loss_and_grad(x, y, 1.0)
            assert_same_bits(m_shared.grads, m_alone.grads)
    assert arena.used > 0
