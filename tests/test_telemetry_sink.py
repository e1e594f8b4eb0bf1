"""The --log-every sink on its own: a row every K steps with the window's figures, per-rank figures across
an epoch boundary (where the loop resets its per-rank counts), and the config on the first row only."""
from types import SimpleNamespace

import numpy as np
import pytest

from lenet_dist.run.sinks import StepState
from lenet_dist.run.telemetry import TelemetrySink


def steps(n, per_epoch=5):
    """The loop's StepState, step by step: 100 examples a step split 60/40, 0.1 s a step, rank compute
    0.06 / 0.05 s, and 2 s of epoch-end work (test evaluation, checkpoint) between epochs."""
    counts = np.zeros(2, np.int64)
    s, t = StepState(), 1000.0
    for k in range(1, n + 1):
        if (k - 1) % per_epoch == 0:
            t += 2.0
            s.begin_epoch((k - 1) // per_epoch, t)
            counts[:] = 0                                   # the loop resets them at every epoch start
        counts += [60, 40]
        t += 0.1
        s.add(k, 100, 100 * 0.5 / k, 90, 0.01 * k, np.array([0.06, 0.05]), t)
        yield s, counts


def test_a_row_every_k_steps_with_the_window_figures():
    rows, counts = [], None
    sink = TelemetrySink(4, [rows.append], rank_examples=lambda: counts)
    sink.on_start(SimpleNamespace(config={"lr": 0.1}))
    for s, counts in steps(12):
        sink.on_step(s)
    assert [r["step"] for r in rows] == [4, 8, 12]
    r = rows[1]                                             # steps 5..8, across the epoch boundary at 6
    assert r["steps"] == 4 and r["seconds"] == pytest.approx(0.4)
    assert r["loss"] == pytest.approx(np.mean([0.5 / k for k in (5, 6, 7, 8)]))
    assert r["acc"] == pytest.approx(0.9) and r["lr"] == pytest.approx(0.08)
    assert r["images_per_s"] == pytest.approx(1000.0)
    assert r["rank_images_per_s"] == pytest.approx([600.0, 400.0])
    assert r["rank_compute_s"] == pytest.approx([0.24, 0.2]) and r["rank_wait_s"] == pytest.approx([0.16, 0.2])
    assert rows[0]["config"] == {"lr": 0.1} and "config" not in rows[1]
    assert all(r["event"] == "step" for r in rows)


def test_one_rank_has_no_per_rank_lists():
    rows = []
    sink = TelemetrySink(2, [rows.append])
    for s, _ in steps(4):
        s.compute_seconds = np.array([0.06])
        sink.on_step(s)
    assert len(rows) == 2 and "rank_compute_s" not in rows[0] and "rank_images_per_s" not in rows[0]


def test_every_output_gets_the_row_and_k_must_be_positive():
    a, b = [], []
    sink = TelemetrySink(1, [a.append, b.append])
    for s, _ in steps(3):
        sink.on_step(s)
    assert a == b and len(a) == 3
    with pytest.raises(ValueError, match="--log-every"):
        TelemetrySink(0, [])
