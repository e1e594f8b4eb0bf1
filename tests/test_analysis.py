"""lenet_dist.evaluation.analysis without any server: the confusion matrix and worst mistakes against slow obvious
versions, feature maps against a direct convolution, and a drawn digit prepared the way MNIST's were."""
import numpy as np
import pytest

from lenet_dist.data import normalize
from lenet_dist.evaluation import analysis

from tests.trained import data, one_blas_thread, trained  # noqa: F401 (fixtures)


def test_analyse_agrees_with_evaluate_and_with_a_slow_count(trained, data):
    x, y = data.test_images, data.test_labels
    a = analysis.analyse(trained, x, y, worst=5)
    assert (a.loss, a.accuracy) == trained.evaluate(x, y)          # the same figures, to the bit
    logits = np.concatenate([trained.forward(normalize(x[i:i + 100])) for i in range(0, len(x), 100)], axis=1)
    pred = logits.argmax(axis=0)
    slow = np.zeros((10, 10), int)
    for t, p in zip(y, pred):
        slow[t, p] += 1
    assert (a.confusion == slow).all() and a.confusion.sum() == len(x)
    for c in range(10):
        assert a.per_class[c] == pytest.approx(np.mean(pred[y == c] == c))
    assert 0.8 < a.accuracy < 1.0                                   # some mistakes to rank
    p = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)
    wrong = np.flatnonzero(pred != y)
    expect = sorted(wrong, key=lambda i: -p[pred[i], i])[:5]
    assert [w["index"] for w in a.worst] == expect
    for w in a.worst:
        assert w["label"] == y[w["index"]] != w["predicted"] == pred[w["index"]]
        assert w["confidence"] == pytest.approx(p[pred[w["index"]], w["index"]], rel=1e-5)
    d = a.to_dict()
    assert d["confusion"][3][3] == slow[3, 3] and len(d["per_class"]) == 10


def test_per_class_of_an_absent_class_is_none(trained, data):
    keep = data.test_labels != 7
    a = analysis.analyse(trained, data.test_images[keep], data.test_labels[keep])
    assert a.per_class[7] is None and a.confusion[7].sum() == 0


def test_probabilities_sum_to_one_and_pick_the_logits_argmax(trained, data):
    p = analysis.probabilities(trained, data.test_images[:20])
    assert p.shape == (20, 10) and np.allclose(p.sum(axis=1), 1.0)
    assert (p.argmax(1) == trained.forward(normalize(data.test_images[:20])).argmax(0)).all()


def test_look_gives_the_forward_pass_probabilities(trained, data):
    for u8 in data.test_images[:5]:
        probs, maps = analysis.look(trained, u8)
        np.testing.assert_allclose(probs, analysis.probabilities(trained, u8[None])[0], rtol=1e-5, atol=1e-7)
        assert maps["conv2"].shape == (16, 10, 10)


def _correlate(x, w, b, pad):
    """Slow direct cross-correlation: x (Ci,H,W), w (Co,Ci,k,k) -> (Co,Ho,Wo)."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    co, _, k, _ = w.shape
    ho, wo = x.shape[1] - k + 1, x.shape[2] - k + 1
    out = np.zeros((co, ho, wo))
    for o in range(co):
        for i in range(ho):
            for j in range(wo):
                out[o, i, j] = (x[:, i:i + k, j:j + k] * w[o]).sum() + b[o]
    return out


def test_feature_maps_match_a_direct_convolution(trained, data):
    u8 = data.test_images[3]
    maps = analysis.feature_maps(trained, u8)
    p = trained.named_params()
    c1 = np.maximum(_correlate(normalize(u8[None]).astype(np.float64), p["conv1.weight"], p["conv1.bias"], 2), 0)
    assert maps["conv1"].shape == (6, 28, 28)
    np.testing.assert_allclose(maps["conv1"], c1, atol=1e-4)
    pooled = c1.reshape(6, 14, 2, 14, 2).max(axis=(2, 4))
    c2 = np.maximum(_correlate(pooled, p["conv2.weight"], p["conv2.bias"], 0), 0)
    assert maps["conv2"].shape == (16, 10, 10)
    np.testing.assert_allclose(maps["conv2"], c2, atol=1e-3)


def test_prepare_digit_crops_scales_and_centres():
    canvas = np.zeros((200, 300))
    canvas[20:120, 210:260] = 1.0                                   # a 100x50 bar far from the centre
    out = analysis.prepare_digit(canvas)
    assert out.shape == (28, 28) and out.dtype == np.uint8
    rows, cols = np.flatnonzero(out.any(1)), np.flatnonzero(out.any(0))
    assert rows[-1] - rows[0] + 1 == 20 and cols[-1] - cols[0] + 1 == 10    # longer side 20, aspect kept
    m = out.astype(float)
    com = ((m.sum(1) @ (np.arange(28) + 0.5)) / m.sum(), (m.sum(0) @ (np.arange(28) + 0.5)) / m.sum())
    assert abs(com[0] - 14) <= 0.5 and abs(com[1] - 14) <= 0.5
    assert out.max() == 255


def test_prepare_digit_centres_the_centre_of_mass_not_the_box():
    canvas = np.zeros((100, 100))
    canvas[10:90, 10:30] = 1.0                                      # an L: a heavy upright bar ...
    canvas[80:90, 30:66] = 1.0                                      # ... and a thin foot to the right
    out = analysis.prepare_digit(canvas).astype(float)
    rows, cols = np.flatnonzero(out.any(1)), np.flatnonzero(out.any(0))
    box = ((rows[0] + rows[-1] + 1) / 2, (cols[0] + cols[-1] + 1) / 2)
    com = ((out.sum(1) @ (np.arange(28) + 0.5)) / out.sum(), (out.sum(0) @ (np.arange(28) + 0.5)) / out.sum())
    assert abs(com[0] - 14) <= 0.5 and abs(com[1] - 14) <= 0.5     # centred by centre of mass
    assert abs(box[1] - 14) >= 2 and abs(box[0] - 14) >= 1          # so the box is not centred


def test_a_digit_drawn_big_and_off_centre_is_still_recognised(trained, data):
    """An MNIST digit blown up 8x and drawn in a corner of a large canvas, prepared, is classified as the
    original is (for the test images the model gets right)."""
    agree = total = 0
    for u8, label in zip(data.test_images[:40], data.test_labels[:40]):
        if analysis.probabilities(trained, u8[None])[0].argmax() != label:
            continue
        canvas = np.zeros((400, 400))
        canvas[150:150 + 224, 20:20 + 224] = np.kron(u8 / 255.0, np.ones((8, 8)))
        prepared = analysis.prepare_digit(canvas)
        agree += analysis.probabilities(trained, prepared[None])[0].argmax() == label
        total += 1
    assert total >= 30 and agree >= total - 2


@pytest.mark.parametrize("bad, reason", [
    (np.zeros((28, 28)), "no ink"),
    (np.full((28, 28), 2.0), r"\[0, 1\]"),
    (np.full((28, 28), np.nan), r"\[0, 1\]"),
    (np.zeros(784), "2-D"),
])
def test_prepare_digit_refuses_bad_drawings(bad, reason):
    with pytest.raises(ValueError, match=reason):
        analysis.prepare_digit(bad)
