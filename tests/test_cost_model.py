"""bench/cost_model.py against the measurements it was made for (bench/multihost-2026-11-29.jsonl: buckets
waited for before the update; bench/multihost-2026-11-29-pipelined.jsonl: the pipelined step; both on a
quiet machine) and against its own arithmetic."""
import importlib.util
import math

import pytest

from tests.mpiutil import REPO
from tests.netns import tbf_burst

spec = importlib.util.spec_from_file_location("cost_model", REPO / "bench" / "cost_model.py")
cm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cm)

MEASURED = REPO / "bench" / "multihost-2026-11-29.jsonl"
PIPELINED = REPO / "bench" / "multihost-2026-11-29-pipelined.jsonl"


def test_the_model_matches_every_measured_point_with_a_core_per_rank():
    calib, runs = cm.load([MEASURED])
    points = [r for r in runs if r["per_host"] == 1 and r["variant"] in ("fused", "overlap", "fp16")]
    assert len(points) == 18                                  # 3 rates x 2 batches x 3 variants
    errors = {(r["rate"], r["batch"], r["variant"]): cm.predict_run(r, calib, compute="run") / r["images_per_s"] - 1
              for r in points}
    assert max(map(abs, errors.values())) <= 0.15, errors


def test_the_model_matches_every_measured_point_of_the_pipelined_step_with_a_core_per_rank():
    calib, runs = cm.load([PIPELINED])
    points = [r for r in runs if r["per_host"] == 1]
    assert len(points) == 30                                  # 3 rates x 2 batches x 5 variants
    assert {r["schedule"] for r in points if r["variant"] in ("overlap", "fp16", "bf16")} == {"pipelined"}
    assert {r["schedule"] for r in points if r["variant"] == "overlap-serial"} == {"serial"}
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


def test_serial_overlap_hides_at_most_the_compute_after_the_fc_bucket():
    c, f, a, rate = 15e-3, 0.55, 20e-6, 100e6
    fused = cm.step_s("fused", c, f, 2, 2, rate, a)
    overlap = cm.step_s("overlap", c, f, 2, 2, rate, a, schedule="serial")
    t_fc = cm.allreduce_s(cm.N_FC, 2, 2, rate, a)
    assert overlap == pytest.approx(c * (1 - f) + t_fc + cm.allreduce_s(cm.N_CONV, 2, 2, rate, a) + a)
    assert fused / overlap < (c + t_fc) / (c * (1 - f) + t_fc) + 1e-9
    assert cm.step_s("fp16", c, f, 2, 2, rate, a, schedule="serial") < overlap                # half the bytes
    assert cm.step_s("overlap", c, f, 1, 1, rate, a) == c                                     # one rank: no sum


def test_the_pipelined_step_hides_the_fc_transfer_behind_the_next_forward_too():
    c, f, g, a, rate = 15e-3, 0.55, 0.38, 20e-6, 100e6
    t_fc, t_conv = cm.allreduce_s(cm.N_FC, 2, 2, rate, a), cm.allreduce_s(cm.N_CONV, 2, 2, rate, a)
    piped = cm.step_s("overlap", c, f, 2, 2, rate, a, g=g)
    assert piped == pytest.approx(c * (1 - f - g) + t_fc + t_conv + a)                      # link-bound here
    assert piped < cm.step_s("overlap", c, f, 2, 2, rate, a, schedule="serial")
    fast = cm.step_s("overlap", c, f, 2, 2, 100e9, a, g=g)                                   # compute-bound
    assert fast == pytest.approx(c + cm.allreduce_s(cm.N_CONV, 2, 2, 100e9, a) + a)
    assert cm.step_s("fp16", c, f, 2, 2, rate, a, g=g, half_s=1e-3) == pytest.approx(
        max(c + 1e-3 + t_conv / 2 + a, (c + 1e-3) * (1 - f - g) + t_fc / 2 + t_conv / 2 + a), rel=0.01)


def test_the_extrapolation_has_one_host_at_the_calibrated_speed_and_a_peak():
    calib, _ = cm.load([MEASURED])
    pts = cm.curve(calib, 256, 1e9, "overlap")
    assert pts[0][0] == 1 and len(pts) == 64
    [one] = [v for v in calib[(2, 1)]["by_batch"].values() if v["shard"] == 256]     # one host: all 256 on it
    assert pts[0][1] == pytest.approx(256 / (1e-3 * one["compute_ms"]))
    h50, best = cm.useful(pts)
    assert 1 <= h50 <= 64 and 1 <= best <= 64 and not math.isnan(pts[-1][1])
    assert pts[best - 1][1] == max(p[1] for p in pts)                 # the peak (past it, efficiency may still
    assert pts[h50 - 1][1] >= 0.5 * h50 * pts[0][1]                   # be >= 50% a while)
