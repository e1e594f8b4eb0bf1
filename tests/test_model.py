"""LeNet5 as a whole: size, the flat parameter / gradient buffers and their views, a whole-model gradient
check in float64, batch independence (the batch-last layout must never mix examples), evaluate()."""
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

try:                    # tests/ as a package (tests/__init__.py) or as a plain directory on sys.path
    from tests.gradcheck import numerical_gradient, rel_errors
except ImportError:
    from gradcheck import numerical_gradient, rel_errors
from lenet_dist.data import load_subset, normalize
from lenet_dist.nn.model import LeNet5, NUM_PARAMS, PARAM_SPECS

OWNERS = {"conv1", "conv2", "fc1", "fc2", "fc3"}


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    # Tiny matrices: with two BLAS threads on a busy 2-core machine these tests ran 20x slower.
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def subset():
    return load_subset()


def batch(seed, n, dtype=np.float64):
    rng = np.random.default_rng([7, seed])
    return rng.normal(size=(n, 28, 28)).astype(dtype), rng.integers(0, 10, size=n)


def offsets():
    out, off = {}, 0
    for name, shape in PARAM_SPECS:
        n = int(np.prod(shape))
        out[name] = (off, n, shape)
        off += n
    return out


def layer_array(model, name, kind):
    owner, pname = name.split(".")
    return getattr(getattr(model, owner), kind)[pname]


# ----------------------------------------------------------------------------------------- structure

def test_parameter_count():
    # PyTorch's count for the same LeNet-5: conv 6*1*25+6, conv 16*6*25+16, fc 400*120+120, 120*84+84, 84*10+10
    expected = (6 * 25 + 6) + (16 * 6 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert expected == 61_706
    assert NUM_PARAMS == 61_706
    m = LeNet5(0)
    assert m.params.shape == (61_706,) and m.grads.shape == (61_706,)
    assert m.params.dtype == np.float32 and m.grads.dtype == np.float32
    assert sum(int(np.prod(s)) for _, s in PARAM_SPECS) == 61_706
    assert sum(a.size for a in m.named_params().values()) == 61_706


def test_param_specs_layout():
    assert [n for n, _ in PARAM_SPECS] == ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
                                           "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias",
                                           "fc3.weight", "fc3.bias"]
    shapes = dict(PARAM_SPECS)
    assert shapes["conv1.weight"] == (6, 1, 5, 5) and shapes["conv2.weight"] == (16, 6, 5, 5)
    assert shapes["fc1.weight"] == (120, 400) and shapes["fc2.weight"] == (84, 120)
    assert shapes["fc3.weight"] == (10, 84) and shapes["fc3.bias"] == (10,)


def test_named_params_are_views_in_spec_order():
    m = LeNet5(3)
    named = m.named_params()
    assert list(named) == [n for n, _ in PARAM_SPECS]
    for name, (off, n, shape) in offsets().items():
        v = named[name]
        assert v.shape == shape and v.dtype == np.float32
        assert np.shares_memory(v, m.params), name
        np.testing.assert_array_equal(v.ravel(), m.params[off:off + n])
        # writing through the view changes the flat vector at exactly this spot, and the layer sees it
        before = m.params.copy()
        v[...] = 1000.0 + np.arange(n, dtype=np.float32).reshape(shape)
        changed = np.flatnonzero(m.params != before)
        assert changed.min() >= off and changed.max() < off + n, name
        np.testing.assert_array_equal(m.params[off:off + n], 1000.0 + np.arange(n))
        np.testing.assert_array_equal(layer_array(m, name, "params"), v)
        assert np.shares_memory(layer_array(m, name, "params"), m.params), name
    np.testing.assert_array_equal(np.concatenate([a.ravel() for a in named.values()]), m.params)


def test_gradients_are_views_into_the_flat_buffer():
    m = LeNet5(4)
    x, y = batch(0, 2, np.float32)
    m.loss_and_grad(x, y, 1.0)
    assert np.shares_memory(m.grads, m.grad_buffer)
    for name, (off, n, shape) in offsets().items():
        g = layer_array(m, name, "grads")
        assert g.shape == shape and np.shares_memory(g, m.grads), name
        np.testing.assert_array_equal(g.ravel(), m.grads[off:off + n])
    assert np.abs(m.grads).sum() > 0
    # the flat buffer is what a layer writes: poison it, run again, every entry is rewritten
    m.grads[:] = np.nan
    m.loss_and_grad(x, y, 1.0)
    assert np.isfinite(m.grads).all()


def test_grad_tail_is_after_the_gradients():
    m = LeNet5(0, grad_tail=3)
    assert m.grad_buffer.shape == (NUM_PARAMS + 3,)
    assert m.grads.shape == (NUM_PARAMS,) and np.shares_memory(m.grads, m.grad_buffer[:NUM_PARAMS])
    m.grad_buffer[NUM_PARAMS:] = 7.0
    x, y = batch(1, 2, np.float32)
    m.loss_and_grad(x, y, 1.0)
    np.testing.assert_array_equal(m.grad_buffer[NUM_PARAMS:], 7.0)


def test_seed_determines_init():
    np.testing.assert_array_equal(LeNet5(5).params, LeNet5(5).params)
    assert not np.array_equal(LeNet5(5).params, LeNet5(6).params)


# --------------------------------------------------------------------------------- gradient check

def test_whole_model_gradient_check_float64():
    m = LeNet5(11, dtype=np.float64)
    assert m.params.dtype == np.float64 and m.grads.dtype == np.float64
    x, y = batch(2, 3)
    scale = 0.7
    m.loss_and_grad(x, y, scale)
    analytic = m.grads.copy()

    def f(_):
        return scale * float(m.loss.forward(m.forward(x), y).sum())

    # ~100 coordinates: ten from every parameter array (so each layer is exercised), the rest anywhere
    rng = np.random.default_rng(12)
    idx = [off + int(i) for off, n, _ in offsets().values() for i in rng.choice(n, min(n, 10), replace=False)]
    idx += [int(i) for i in rng.choice(NUM_PARAMS, 100 - len(idx), replace=False)]
    numeric = numerical_gradient(f, m.params, h=1e-5, indices=idx)
    err = rel_errors(analytic[idx], numeric)
    assert np.count_nonzero(analytic[idx]) > 50             # the check is not vacuous
    # a ReLU or pool kink crossed by the finite difference can spoil a coordinate or two
    assert np.quantile(err, 0.95) < 1e-6, np.sort(err)[-10:]
    assert err.max() < 1e-4, np.sort(err)[-10:]


def test_loss_and_grad_is_linear_in_scale():
    m = LeNet5(13, dtype=np.float64)
    x, y = batch(3, 4)
    loss1, correct1 = m.loss_and_grad(x, y, 1.0)
    g1 = m.grads.copy()
    loss2, correct2 = m.loss_and_grad(x, y, 2.5)
    np.testing.assert_allclose(m.grads, 2.5 * g1, rtol=1e-12, atol=1e-15)
    assert (loss1, correct1) == (loss2, correct2)               # the returned figures ignore the scale
    m.loss_and_grad(x, y, 0.0)
    assert not m.grads.any()
    # the loss returned is the SUM over the batch
    logits = m.forward(x)
    z = logits - logits.max(0)
    ce = np.log(np.exp(z).sum(0)) - z[y, np.arange(4)]
    assert loss1 == pytest.approx(ce.sum(), rel=1e-12)
    assert correct1 == int((logits.argmax(0) == y).sum())


def test_gradients_are_overwritten_not_accumulated():
    m = LeNet5(14)
    x, y = batch(4, 5, np.float32)
    m.loss_and_grad(x, y, 1.0)
    g = m.grads.copy()
    m.loss_and_grad(x, y, 1.0)
    np.testing.assert_array_equal(m.grads, g)


def test_batch_gradient_is_sum_of_per_example_gradients():
    m = LeNet5(15, dtype=np.float64)
    x, y = batch(5, 4)
    total, _ = m.loss_and_grad(x, y, 1.0)
    g = m.grads.copy()
    parts, loss_parts = np.zeros_like(g), 0.0
    for i in range(4):
        loss_parts += m.loss_and_grad(x[i:i + 1], y[i:i + 1], 1.0)[0]
        parts += m.grads
    np.testing.assert_allclose(g, parts, rtol=1e-10, atol=1e-12)
    assert total == pytest.approx(loss_parts, rel=1e-12)


# ----------------------------------------------------------------------------------- batch handling

@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_forward_has_no_cross_talk_across_the_batch(dtype, tol):
    m = LeNet5(16, dtype=dtype)
    x, _ = batch(6, 7, dtype)
    whole = m.forward(x).copy()
    assert whole.shape == (10, 7) and whole.dtype == dtype
    for i in range(7):
        one = m.forward(x[i:i + 1])
        assert one.shape == (10, 1)
        np.testing.assert_allclose(one[:, 0], whole[:, i], rtol=tol, atol=tol)
    # changing one example changes its own column and no other
    x2 = x.copy()
    x2[3] += 1.0
    after = m.forward(x2)
    np.testing.assert_allclose(np.delete(after, 3, axis=1), np.delete(whole, 3, axis=1), rtol=tol, atol=tol)
    assert not np.allclose(after[:, 3], whole[:, 3])


def test_many_batch_sizes_in_turn():
    # scratch buffers are cached per shape; cycling through more shapes than the cache keeps must still
    # give every batch its own right answer
    m = LeNet5(17, dtype=np.float64)
    fresh = LeNet5(17, dtype=np.float64)
    x, y = batch(7, 8)
    for n in (1, 2, 3, 4, 5, 6, 8, 1, 3, 8):
        got = m.forward(x[:n]).copy()
        np.testing.assert_allclose(got, LeNet5(17, dtype=np.float64).forward(x[:n]), rtol=1e-12, atol=1e-12)
        m.loss_and_grad(x[:n], y[:n], 1.0)
        fresh.loss_and_grad(x[:n], y[:n], 1.0)
        np.testing.assert_allclose(m.grads, fresh.grads, rtol=1e-12, atol=1e-14)
        fresh = LeNet5(17, dtype=np.float64)


def test_batch_of_one():
    m = LeNet5(18)
    x, y = batch(8, 1, np.float32)
    logits = m.forward(x)
    assert logits.shape == (10, 1) and logits.dtype == np.float32 and np.isfinite(logits).all()
    loss, correct = m.loss_and_grad(x, y, 1.0)
    assert np.isfinite(loss) and loss > 0 and correct in (0, 1)
    assert np.isfinite(m.grads).all() and m.grads.any()


def test_float32_model_stays_float32():
    m = LeNet5(19)
    x, y = batch(9, 3, np.float32)
    assert m.forward(x).dtype == np.float32
    m.loss_and_grad(x, y, 1.0)
    assert m.grads.dtype == np.float32 and m.params.dtype == np.float32
    for owner in OWNERS:
        layer = getattr(m, owner)
        assert all(a.dtype == np.float32 for a in (*layer.params.values(), *layer.grads.values()))


# -------------------------------------------------------------------------------- loading, evaluate

def test_load_named_gives_identical_logits():
    a, b = LeNet5(20), LeNet5(21)
    x, _ = batch(10, 5, np.float32)
    assert not np.array_equal(a.forward(x), b.forward(x))
    b.load_named({k: v.copy() for k, v in a.named_params().items()})
    np.testing.assert_array_equal(b.params, a.params)
    np.testing.assert_array_equal(b.forward(x), a.forward(x))


def test_load_named_rejects_a_wrong_shape():
    m = LeNet5(22)
    arrays = {k: v.copy() for k, v in LeNet5(23).named_params().items()}
    arrays["fc1.weight"] = arrays["fc1.weight"].T
    with pytest.raises(ValueError, match=r"fc1\.weight"):
        m.load_named(arrays)


@pytest.mark.parametrize("batch_size", [500, 300])
def test_evaluate_matches_a_manual_computation(subset, batch_size):
    m = LeNet5(24)
    images, labels = subset.test_images, subset.test_labels
    assert len(images) == 1000
    loss, acc = m.evaluate(images, labels, batch_size=batch_size)
    # by hand, in one batch, the loss in float64 from the model's float32 logits
    logits = m.forward(normalize(images)).astype(np.float64)
    y = labels.astype(np.intp)
    z = logits - logits.max(0)
    ce = np.log(np.exp(z).sum(0)) - z[y, np.arange(len(y))]
    assert loss == pytest.approx(ce.mean(), rel=1e-5)
    assert abs(acc - (logits.argmax(0) == y).mean()) <= 1 / len(y)   # one borderline argmax at most
    assert 0.0 <= acc <= 1.0 and np.isfinite(loss) and loss > 0


def test_evaluate_reflects_the_parameters(subset):
    m = LeNet5(25)
    m.params[:] = 0.0                      # all logits equal: loss is exactly log(10), argmax is class 0
    loss, acc = m.evaluate(subset.test_images[:100], subset.test_labels[:100])
    assert loss == pytest.approx(np.log(10), rel=1e-6)
    assert acc == pytest.approx(np.mean(subset.test_labels[:100] == 0))
