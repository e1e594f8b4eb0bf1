"""The measured choice between the fused allreduce and the buckets (lenet_dist/parallel/autotune.py): its schedule,
its decision, and that every rank decides alike (the figures are summed over the ranks)."""
import numpy as np
import pytest

from lenet_dist.parallel import autotune
from lenet_dist.parallel.autotune import BLOCK, BLOCKS, PathChooser, WARMUP


class TwoRanks:
    """allreduce_ as two ranks with the same figures would see it."""
    size = 2

    def allreduce_(self, buf):
        buf *= 2
        return buf


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def run_trial(fused_s, buckets_s, steps=None):
    """Drive a chooser through `steps` steps whose duration depends on the path taken."""
    clock = Clock()
    ch = PathChooser(TwoRanks(), clock=clock)
    settled, paths = [], []
    for step in range(steps if steps is not None else ch.trial_steps + 5):
        path = ch.path(step)
        paths.append(path)
        ch.step_starts(step)
        clock.now += fused_s if path == "fused" else buckets_s
        ch.step_ends(step, lambda: settled.append(step))
    return ch, paths, settled


def test_the_trial_interleaves_blocks_after_a_warm_up_and_settles_each_block():
    ch, paths, settled = run_trial(1.0, 1.0)
    assert paths[:WARMUP] == ["buckets"] * WARMUP
    trial = paths[WARMUP:ch.trial_steps]
    assert trial == [p for b in range(BLOCKS) for p in [autotune.PATHS[b % 2]] * BLOCK]
    assert settled == [WARMUP + BLOCK * (b + 1) - 1 for b in range(BLOCKS)]        # each block's last step
    assert ch.decided == "buckets" and paths[ch.trial_steps:] == ["buckets"] * 5     # a tie: the buckets


@pytest.mark.parametrize("fused_s, buckets_s, want", [
    (1.0, 2.0, "fused"), (2.0, 1.0, "buckets"),
    (0.99, 1.0, "buckets"),                    # fused must win by MARGIN
    (0.97, 1.0, "fused"),
])
def test_the_faster_path_is_kept(fused_s, buckets_s, want):
    ch, paths, _ = run_trial(fused_s, buckets_s)
    assert ch.decided == want and paths[-1] == want
    assert ch.medians["fused"] == pytest.approx(fused_s) and ch.medians["buckets"] == pytest.approx(buckets_s)


def test_a_run_too_short_for_the_trial_keeps_the_buckets():
    ch, paths, _ = run_trial(1.0, 5.0, steps=WARMUP + BLOCK * BLOCKS - 1)
    assert ch.decided is None and ch.path(10_000) == "buckets"


def test_one_slow_block_does_not_decide():
    """The median of each path's blocks: one block slowed by something else on the machine is outvoted."""
    clock = Clock()
    ch = PathChooser(TwoRanks(), clock=clock)
    for step in range(ch.trial_steps):
        path = ch.path(step)
        ch.step_starts(step)
        slow = WARMUP <= step < WARMUP + BLOCK                                     # the first fused block
        clock.now += (10.0 if slow else 1.0) if path == "fused" else 1.2
        ch.step_ends(step, lambda: None)
    assert ch.decided == "fused"
    assert np.isclose(ch.medians["fused"], 1.0)
