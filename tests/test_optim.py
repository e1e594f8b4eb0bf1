"""SGD against a hand-written reference of optim.py's documented (PyTorch) update, its saved state, its
argument checks, and the learning-rate schedules at chosen steps."""
import math

import numpy as np
import pytest

from lenet_dist.nn.optim import LRSchedule, SGD


def reference_sgd(w, grads_seq, lrs, momentum, nesterov, weight_decay):
    """The docstring's update, one step at a time, written plainly:
        g <- g + wd * w ;  v <- m * v + g ;  w <- w - lr * (g + m * v) if nesterov else w - lr * v"""
    w, v = w.astype(np.float64).copy(), np.zeros(w.shape)
    for g, lr in zip(grads_seq, lrs):
        g = g + weight_decay * w
        v = momentum * v + g
        w = w - lr * (g + momentum * v) if nesterov else w - lr * v
    return w, v


CASES = {
    "plain": dict(momentum=0.0, nesterov=False, weight_decay=0.0),
    "momentum": dict(momentum=0.9, nesterov=False, weight_decay=0.0),
    "nesterov": dict(momentum=0.9, nesterov=True, weight_decay=0.0),
    "weight_decay": dict(momentum=0.0, nesterov=False, weight_decay=0.01),
    "momentum_wd": dict(momentum=0.5, nesterov=False, weight_decay=5e-4),
    "nesterov_wd": dict(momentum=0.8, nesterov=True, weight_decay=0.05),
}


def problem(seed, n=37, steps=6):
    rng = np.random.default_rng([3, seed])
    w0 = rng.normal(size=n)
    grads = [rng.normal(size=n) for _ in range(steps)]
    lrs = [0.1, 0.05, 0.2, 0.0, 0.3, 0.07][:steps]
    return w0, grads, lrs


@pytest.mark.parametrize("name", list(CASES))
def test_sgd_matches_reference(name):
    kw = CASES[name]
    w0, grads, lrs = problem(1)
    params = w0.copy()
    opt = SGD(params, **kw)
    for g, lr in zip(grads, lrs):
        opt.step(g, lr)
    w_ref, v_ref = reference_sgd(w0, grads, lrs, **kw)
    np.testing.assert_allclose(params, w_ref, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(opt.velocity, v_ref, rtol=1e-13, atol=1e-15)
    assert not np.allclose(params, w0)


def test_the_cases_really_differ():
    # a reference that ignored nesterov or weight decay would pass the test above only if these coincide
    w0, grads, lrs = problem(2)
    results = [reference_sgd(w0, grads, lrs, **kw)[0] for kw in CASES.values()]
    for i in range(len(results)):
        for j in range(i):
            assert not np.allclose(results[i], results[j]), (list(CASES)[i], list(CASES)[j])


def test_sgd_float32_updates_in_place():
    w0, grads, lrs = problem(3)
    params = w0.astype(np.float32)
    ref = params
    opt = SGD(params, momentum=0.9, nesterov=True, weight_decay=1e-3)
    assert opt.velocity.dtype == np.float32
    for g, lr in zip(grads, lrs):
        opt.step(g.astype(np.float32), lr)
    assert params is ref and params.dtype == np.float32 and opt.velocity.dtype == np.float32
    w_ref, _ = reference_sgd(w0.astype(np.float32), [g.astype(np.float32) for g in grads], lrs,
                             momentum=0.9, nesterov=True, weight_decay=1e-3)
    np.testing.assert_allclose(params, w_ref, rtol=1e-5, atol=1e-6)


def test_first_momentum_step_is_plain_sgd():
    # PyTorch starts the buffer at the first gradient; a zero velocity gives the same first step
    params = np.array([1.0, -2.0])
    SGD(params, momentum=0.9).step(np.array([0.5, 0.25]), 0.1)
    np.testing.assert_allclose(params, [0.95, -2.025], rtol=1e-15)


def test_state_dict_round_trip_continues_bit_identically():
    w0, grads, lrs = problem(4, steps=6)
    kw = dict(momentum=0.9, nesterov=True, weight_decay=5e-4)
    a_params = w0.astype(np.float32)
    a = SGD(a_params, **kw)
    for g, lr in zip(grads[:3], lrs[:3]):
        a.step(g.astype(np.float32), lr)
    state = a.state_dict()
    assert not np.shares_memory(state["velocity"], a.velocity)     # a snapshot, not a live view
    b_params = a_params.copy()
    b = SGD(b_params, **kw)
    b.load_state_dict(state)
    for g, lr in zip(grads[3:], lrs[3:]):
        a.step(g.astype(np.float32), lr)
        b.step(g.astype(np.float32), lr)
    np.testing.assert_array_equal(b_params, a_params)
    np.testing.assert_array_equal(b.velocity, a.velocity)
    # without the state the continuation differs: the check above is not vacuous
    c_params = w0.astype(np.float32)
    c = SGD(c_params, **kw)
    for g, lr in zip(grads[:3], lrs[:3]):
        c.step(g.astype(np.float32), lr)
    c2_params = c_params.copy()
    c2 = SGD(c2_params, **kw)
    for g, lr in zip(grads[3:], lrs[3:]):
        c2.step(g.astype(np.float32), lr)
    assert not np.array_equal(c2_params, a_params)


def test_load_state_dict_rejects_wrong_shape_or_dtype():
    opt = SGD(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        opt.load_state_dict({"velocity": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match="float64"):
        opt.load_state_dict({"velocity": np.zeros(5, np.float64)})


@pytest.mark.parametrize("kw,needle", [
    (dict(momentum=1.0), "1.0"),
    (dict(momentum=-0.1), "-0.1"),
    (dict(momentum=1.5), "1.5"),
    (dict(weight_decay=-0.001), "-0.001"),
    (dict(momentum=0.0, nesterov=True), "nesterov"),
])
def test_sgd_rejects_bad_hyperparameters(kw, needle):
    with pytest.raises(ValueError) as e:
        SGD(np.zeros(3), **kw)
    assert needle in str(e.value)


@pytest.mark.parametrize("lr", [-0.1, float("nan"), float("inf")])
def test_sgd_rejects_bad_learning_rate(lr):
    params = np.ones(3)
    opt = SGD(params)
    with pytest.raises(ValueError) as e:
        opt.step(np.ones(3), lr)
    assert str(lr) in str(e.value)
    np.testing.assert_array_equal(params, 1.0)          # nothing was updated


# ------------------------------------------------------------------------------------------ schedules

def test_warmup_is_linear_then_constant():
    s = LRSchedule(0.1, kind="constant", total_steps=100, steps_per_epoch=10, warmup_steps=4)
    assert [s(i) for i in range(6)] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    assert s(99) == pytest.approx(0.1)


def test_constant_without_warmup():
    s = LRSchedule(0.3, kind="constant", total_steps=10, steps_per_epoch=5)
    assert all(s(i) == 0.3 for i in range(12))


def test_step_schedule():
    # 10 steps per epoch, decay by 0.5 every 2 epochs
    s = LRSchedule(0.2, kind="step", total_steps=100, steps_per_epoch=10, gamma=0.5, step_epochs=2)
    expected = {0: 0.2, 19: 0.2, 20: 0.1, 39: 0.1, 40: 0.05, 60: 0.025, 99: 0.0125}
    for step, lr in expected.items():
        assert s(step) == pytest.approx(lr), step


def test_step_schedule_with_warmup():
    s = LRSchedule(0.2, kind="step", total_steps=100, steps_per_epoch=10, warmup_steps=5,
                   gamma=0.1, step_epochs=1)
    assert s(0) == pytest.approx(0.04) and s(4) == pytest.approx(0.2)
    assert s(5) == pytest.approx(0.2) and s(10) == pytest.approx(0.02) and s(25) == pytest.approx(0.002)


def test_cosine_schedule():
    base, low = 0.1, 0.001
    s = LRSchedule(base, kind="cosine", total_steps=110, steps_per_epoch=10, warmup_steps=10, min_lr=low)
    assert s(0) == pytest.approx(0.01) and s(9) == pytest.approx(0.1)
    assert s(10) == pytest.approx(base)                                # decay starts after warm-up
    assert s(60) == pytest.approx((base + low) / 2)                   # halfway through 100 decay steps
    assert s(35) == pytest.approx(low + 0.5 * (base - low) * (1 + math.cos(math.pi * 0.25)))
    assert s(110) == pytest.approx(low) and s(500) == pytest.approx(low)
    lrs = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))                 # monotone decay
    assert min(lrs) >= low


@pytest.mark.parametrize("kw,needle", [
    (dict(base_lr=0.1, kind="linear"), "linear"),
    (dict(base_lr=0.0, kind="constant"), "0.0"),
    (dict(base_lr=-1.0, kind="constant"), "-1.0"),
    (dict(base_lr=0.1, kind="constant", warmup_steps=-1), "-1"),
    (dict(base_lr=0.1, kind="constant", total_steps=0), "total=0"),
    (dict(base_lr=0.1, kind="constant", steps_per_epoch=0), "per epoch=0"),
])
def test_schedule_rejects_bad_arguments(kw, needle):
    args = dict(total_steps=10, steps_per_epoch=5)
    args.update(kw)
    base = args.pop("base_lr")
    with pytest.raises(ValueError) as e:
        LRSchedule(base, **args)
    assert needle in str(e.value)
