"""The bucketed allreduce (buckets.py) and half-precision gradients with error feedback (halfprec.py,
compressed.py), in one process (LocalComm: every sum is over one rank, so what is left is the bucketing,
the rounding and the feedback). Against the fused float32 path over real mpirun: test_buckets_mpi.py."""
import numpy as np
import pytest

from lenet_dist.comm import LocalComm
from lenet_dist.config import TrainConfig
from lenet_dist.nn.model import LeNet5, NUM_PARAMS
from lenet_dist.parallel import buckets, compressed, halfprec


@pytest.mark.parametrize("kb", [1, 16, 64, 1000])
def test_buckets_tile_the_gradient_from_the_end_at_layer_boundaries(kb):
    plan = buckets.plan(kb)
    assert plan[0][1] == NUM_PARAMS and plan[-1][0] == 0
    for (lo, hi), (lo2, hi2) in zip(plan, plan[1:]):
        assert hi2 == lo and lo2 < hi2                           # contiguous, last layers first
    starts = set(buckets.layer_starts())
    assert all(lo in starts for lo, _ in plan)
    assert all((hi - lo) * 4 >= kb * 1024 for lo, hi in plan[:-1])   # only the last one may be smaller
    assert buckets.plan(64) == [(2572, NUM_PARAMS), (0, 2572)]       # fc1..fc3, then conv1..conv2


def test_backward_reports_each_layer_as_soon_as_its_gradients_are_final():
    rng = np.random.default_rng(0)
    m = LeNet5(seed=1)
    x, y = rng.standard_normal((6, 28, 28)).astype(np.float32), rng.integers(0, 10, 6)
    m.loss_and_grad(x, y, 1.0)
    m.grads[:] = np.nan                                          # nothing stale may pass for final
    seen = []
    m.loss_and_grad(x, y, 1.0, ready=lambda off: seen.append((off, m.grads[off:].copy())))
    assert [off for off, _ in seen] == sorted(buckets.layer_starts(), reverse=True)
    for off, snapshot in seen:
        np.testing.assert_array_equal(snapshot, m.grads[off:])   # final when reported: never changed after


def test_bfloat16_rounds_to_nearest_even_and_back_exactly():
    # bfloat16 keeps 7 bits after the point: at 1.0 its step is 2**-7, so 1 + 2**-8 is a tie
    x = np.array([1.0, -2.5, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -12, 3e38, 1e-30], np.float32)
    got = halfprec.from_bfloat16(halfprec.to_bfloat16(x))
    np.testing.assert_array_equal(got[:2], x[:2])                # representable: unchanged
    assert got[2] == 1.0                                         # a tie: to the even neighbour (down) ...
    assert got[3] == 1 + 2 ** -6                                 # ... or up
    assert got[4] == 1 + 2 ** -7                                 # above the midpoint: up
    assert np.isfinite(got[5]) and abs(got[5] - 3e38) / 3e38 < 2 ** -8
    assert abs(got[6] - 1e-30) / 1e-30 < 2 ** -8                 # float32's range: no flush to zero


def test_float16_rounds_to_nearest_even_and_overflows_to_inf():
    x = np.array([1.0, -2.5, 1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -11 + 2 ** -15, 65519.0, 65520.0, 1e-8,
                  2 ** -24, -(2 ** -25) * 3], np.float32)
    out = np.zeros(len(x), np.float16)
    assert halfprec.to_float16(x, out=out) is out
    got = out.astype(np.float32)
    assert got[:2].tolist() == [1.0, -2.5]                       # representable: unchanged
    assert got[2] == 1.0 and got[3] == 1 + 2 ** -9               # ties: to the even neighbour, down or up
    assert got[4] == 1 + 2 ** -10                                # above the midpoint: up
    assert got[5] == 65504.0 and got[6] == np.inf                # the largest half, then overflow
    assert got[7] == 0.0 and got[8] == 2 ** -24                  # below half the smallest subnormal; the smallest
    assert got[9] == -(2 ** -23)                                 # a subnormal tie goes to the even one
    assert np.array_equal(halfprec.to_float16(x).view(np.uint16), out.view(np.uint16))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_agreed_scale_leaves_headroom_and_keeps_small_values(dtype):
    for bound in (1e-6, 0.37, 5.0, 12345.0, 3e7):
        s = halfprec.agreed_scale(bound, dtype)
        assert s == 2.0 ** round(np.log2(s))                     # a power of two: no significant bit changes
        top = halfprec.HEADROOM * bound * s
        assert top <= halfprec.HALF_MAX[dtype]
        assert top > halfprec.HALF_MAX[dtype] / 2 or s == 2.0 ** 100     # (bfloat16: capped, float32's range)
    assert halfprec.agreed_scale(0.0, dtype) is None and halfprec.agreed_scale(np.inf, dtype) is None
    # a gradient spanning 10 orders of magnitude below its largest value: nothing flushes to zero
    g = np.float32(5.0) * np.logspace(0, -10, 50).astype(np.float32)
    s = halfprec.agreed_scale(float(np.abs(g).max()), dtype)
    h = np.empty(len(g), halfprec.STORAGE[dtype])
    halfprec.encode(g.copy(), np.zeros_like(g), s, dtype, out=h)
    back = halfprec.decode(h, s, dtype)
    assert (back != 0).all() and np.isfinite(back).all()


def reducer(dtype, kb=64):
    comm = LocalComm()
    buf = np.zeros(NUM_PARAMS + 4 + buckets.tail_slots(kb, dtype), np.float32)
    return buf, compressed.CompressedAllreduce(comm, buf, bucket_kb=kb, dtype=dtype)


def applied_sum(dtype, grads, feedback=True):
    """Sum over steps of what the reducer hands the optimizer, for one rank's gradients `grads`."""
    buf, red = reducer(dtype)
    total = np.zeros(NUM_PARAMS, np.float64)
    for g in grads:
        buf[:NUM_PARAMS] = g
        red.ready(0)
        red.finish()
        red.settle()
        total += buf[:NUM_PARAMS]
        if not feedback:
            red.residual[:] = 0                                  # what the test shows error feedback does
    return total, red


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_error_feedback_keeps_the_long_run_sum_within_one_rounding(dtype):
    # A gradient that changes slowly and is not representable in half: rounding has the same bias step after
    # step. Without feedback the applied sum drifts away linearly; with it, the gap stays within what one
    # step's rounding can lose (the last residual), however many steps.
    rng = np.random.default_rng(5)
    base = rng.standard_normal(NUM_PARAMS).astype(np.float32) * np.float32(1e-2)
    steps = 400
    grads = [base * np.float32(1 + 1e-4 * t) for t in range(steps)]
    exact = np.sum(np.array(grads, np.float64), axis=0)
    with_fb, red = applied_sum(dtype, grads)
    without, _ = applied_sum(dtype, grads, feedback=False)
    ulp = 2.0 ** -(11 if dtype == "float16" else 8)              # relative rounding step of the format
    one_rounding = ulp * np.abs(np.array(grads[-5:])).max()
    gap = np.abs(with_fb - exact).max()
    assert gap <= one_rounding                                    # bounded: does not grow with the steps
    assert np.abs(np.float64(red.residual) - (exact - with_fb)).max() <= 1e-3 * one_rounding + 1e-9 * \
        np.abs(exact).max()                                       # the gap is exactly what is still owed
    assert np.abs(without - exact).max() > 5 * one_rounding      # the bias that feedback removes
    assert red.overflows == 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_first_step_travels_in_float32_and_an_overflow_is_summed_again_in_float32(dtype):
    buf, red = reducer(dtype)
    g = np.random.default_rng(2).standard_normal(NUM_PARAMS).astype(np.float32)
    for factor in (1.0, 1.0):
        buf[:NUM_PARAMS] = g * factor
        red.ready(0)
        red.finish()
        red.settle()
    assert red.scale[0] is not None
    huge = g * np.float32(1e6 if dtype == "float16" else 1.0)
    if dtype == "bfloat16":                                        # bfloat16's range: force the overflow
        red.scale = [s * 2.0 ** 100 for s in red.scale]
    buf[:NUM_PARAMS] = huge
    red.ready(0)
    red.finish()
    red.settle()
    assert red.overflows >= 1
    assert np.isfinite(buf[:NUM_PARAMS]).all()
    lo, hi = red.buckets[0]
    np.testing.assert_allclose(buf[lo:hi], huge[lo:hi] + 0, rtol=1e-2)   # the float32 sum (plus old residual)
    assert not red.residual[lo:hi].any()


def test_config_refuses_half_precision_where_it_cannot_apply():
    with pytest.raises(ValueError, match="needs the bucketed float allreduce"):
        TrainConfig(allreduce_dtype="float16", bucket_kb=0)
    with pytest.raises(ValueError, match="needs the bucketed float allreduce"):
        TrainConfig(allreduce_dtype="bfloat16", deterministic=True)
    with pytest.raises(ValueError, match="allreduce_dtype must be"):
        TrainConfig(allreduce_dtype="int8")
    assert TrainConfig.from_dict(TrainConfig(bucket_kb=16, allreduce_dtype="float16").to_dict()).bucket_kb == 16


def test_bucket_kb_is_an_integer_or_none_for_the_placement_rule():
    assert TrainConfig().bucket_kb is None                                  # the default: by placement
    assert TrainConfig.from_dict(TrainConfig().to_dict()).bucket_kb is None
    assert TrainConfig(bucket_kb=0).bucket_kb == 0 and TrainConfig(bucket_kb=-1).bucket_kb == -1
    for bad in ("64", 1.5, True):
        with pytest.raises(ValueError, match="bucket_kb must be of type int"):
            TrainConfig(bucket_kb=bad)
    with pytest.raises(ValueError, match="bucket_kb must be"):
        TrainConfig(bucket_kb=-2)
