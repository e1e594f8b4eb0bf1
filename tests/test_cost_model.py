"""bench/cost_model.py against the measurements it was made for (bench/multihost-2026-11-29.jsonl, a quiet
machine) and against its own arithmetic."""
import importlib.util
import math

import pytest

from .mpiutil import REPO
from .netns import tbf_burst

spec = importlib.util.spec_from_file_location("cost_model", REPO / "bench" / "cost_model.py")
cm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cm)

MEASURED = REPO / "bench" / "multihost-2026-11-29.jsonl"


def test_the_model_matches_every_measured_point_with_a_core_per_rank():
    calib, runs = cm.load([MEASURED])
    points = [r for r in runs if r["per_host"] == 1 and r["variant"] in ("fused", "overlap", "fp16")]
    assert len(points) == 18                                  # 3 rates x 2 batches x 3 variants
    errors = {(r["rate"], r["batch"], r["variant"]): cm.predict_run(r, calib, compute="run") / r["images_per_s"] - 1
              for r in points}
    assert max(map(abs, errors.values())) <= 0.15, errors


def test_a_token_bucket_lets_its_fill_through_at_once():
    a, rate = 20e-6, 1e9
    plain = cm.allreduce_s(cm.N_BYTES, 2, 2, rate, a)
    assert plain == pytest.approx(2 * a + cm.N_BYTES * 8 / (rate * cm.GOODPUT))
    assert cm.allreduce_s(cm.N_BYTES, 2, 2, rate, a, tbf_burst(rate)) == pytest.approx(
        2 * a + (cm.N_BYTES - 125_000) * 8 / (rate * cm.GOODPUT))
    assert cm.allreduce_s(cm.N_BYTES, 2, 2, 10e9, a, tbf_burst(10e9)) == pytest.approx(2 * a)   # all in the bucket


def test_overlap_hides_at_most_the_compute_after_the_fc_bucket():
    c, f, a, rate = 15e-3, 0.55, 20e-6, 100e6
    fused = cm.step_s("fused", c, f, 2, 2, rate, a)
    overlap = cm.step_s("overlap", c, f, 2, 2, rate, a)
    t_fc = cm.allreduce_s(cm.N_FC, 2, 2, rate, a)
    assert overlap == pytest.approx(c * (1 - f) + t_fc + cm.allreduce_s(cm.N_CONV, 2, 2, rate, a) + a)
    assert fused / overlap < (c + t_fc) / (c * (1 - f) + t_fc) + 1e-9
    assert cm.step_s("fp16", c, f, 2, 2, rate, a) < overlap                                   # half the bytes
    assert cm.step_s("overlap", c, f, 1, 1, rate, a) == c                                     # one rank: no sum


def test_the_extrapolation_has_one_host_at_the_calibrated_speed_and_a_peak():
    calib, _ = cm.load([MEASURED])
    pts = cm.curve(calib, 256, 1e9, "overlap")
    assert pts[0][0] == 1 and len(pts) == 64
    [one] = [v for v in calib[(2, 1)]["by_batch"].values() if v["shard"] == 256]     # one host: all 256 on it
    assert pts[0][1] == pytest.approx(256 / (1e-3 * one["compute_ms"]))
    h50, best = cm.useful(pts)
    assert 1 <= h50 <= best <= 64 and not math.isnan(pts[-1][1])
