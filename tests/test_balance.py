"""ShardBalancer (--balance): cuts that tile the batch, follow measured speeds, and hold still under jitter."""
import numpy as np
import pytest

from lenet_dist.data import sampler
from lenet_dist.parallel.balance import MAX_SPREAD, ShardBalancer


def run(bal, n, cost, steps, quantum=1, overhead=0.0):
    """Simulate `steps` steps of ranks whose per-item seconds are `cost(sizes)` (a function of all sizes)."""
    for _ in range(steps):
        sizes = np.diff(bal.plan(n, quantum))
        bal.observe(sizes, cost(sizes) + overhead * (sizes > 0))
    return np.diff(bal.plan(n, quantum))


@pytest.mark.parametrize("n,size", [(256, 2), (50, 3), (3, 4), (0, 2), (7, 1)])
def test_before_any_measurement_the_cut_is_the_equal_one(n, size):
    cuts = ShardBalancer(size).plan(n)
    assert [(cuts[r], cuts[r + 1]) for r in range(size)] == [sampler.shard_bounds(n, r, size) for r in range(size)]


def test_cuts_always_tile_the_batch():
    rng = np.random.default_rng(0)
    for _ in range(300):
        size = int(rng.integers(2, 6))
        bal = ShardBalancer(size)
        bal.weights[:] = rng.uniform(0.01, 10, size)
        n, q = int(rng.integers(0, 300)), int(rng.integers(1, 9))
        cuts = bal.plan(n, q)
        assert cuts[0] == 0 and cuts[-1] == n and (np.diff(cuts) >= 0).all()


def test_shares_follow_speed_and_equalize_compute_time():
    speed = np.array([3.0, 1.0])                             # rank 1 three times slower
    sizes = run(ShardBalancer(2), 256, lambda s: s / speed, 60)
    assert abs(sizes[1] - 64) <= 1                           # 192 / 64: equal seconds on both
    assert sizes.sum() == 256


def test_fixed_point_with_per_step_overhead_is_equal_time():
    speed = np.array([1.0, 1.0, 2.0])
    sizes = run(ShardBalancer(3), 400, lambda s: s / speed, 80, overhead=20.0)
    t = sizes / speed + 20.0
    assert t.max() - t.min() <= 0.05 * t.max()              # the cut stops once a move gains < 3%


def test_ranks_sharing_one_core_stay_even():
    # Two ranks time-sharing a core: the one with less work finishes at 2 * its work, the other at the
    # total. Measured speeds then favour the bigger shard, which must not run away.
    def shared(s):
        lo, hi = np.minimum(s[0], s[1]), np.maximum(s[0], s[1])
        return np.where(s == lo, 2.0 * lo, lo + hi).astype(float)
    bal = ShardBalancer(2)
    bal.weights[:] = [2.0, 1.0]                              # start far off balance
    sizes = run(bal, 256, shared, 80)
    assert abs(int(sizes[0]) - 128) <= 8                     # from 171 / 85 back to within 3%-ish of even


def test_one_wild_measurement_cannot_starve_a_rank():
    bal = ShardBalancer(4)
    bal.observe([64] * 4, [0.01] * 4)
    bal.observe([64] * 4, [0.01, 0.01, 0.01, 1e4])          # a rank paused for seconds
    w = bal.weights
    assert w.min() >= np.median(w) / MAX_SPREAD - 1e-12
    assert np.diff(bal.plan(256))[3] > 0


def test_disabled_or_single_rank_never_moves():
    for bal in (ShardBalancer(2, enabled=False), ShardBalancer(1)):
        bal.observe([1] * bal.size, [5.0] + [1.0] * (bal.size - 1))
        cuts = bal.plan(10)
        assert list(np.diff(cuts)) == [10 // bal.size] * bal.size


def test_a_rank_with_no_work_keeps_its_estimate():
    bal = ShardBalancer(2)
    bal.observe([10, 10], [1.0, 1.0])
    before = bal.weights.copy()
    bal.observe([10, 0], [1.0, 0.0])
    assert bal.weights[1] == before[1]


def test_straggler_names_the_slow_rank_only_past_the_threshold():
    from lenet_dist.parallel.balance import straggler
    assert straggler([100, 100, 100], [1.0, 3.0, 1.1]) == (1, 0, 3.0)
    assert straggler([100, 100], [1.0, 1.4]) is None                 # 1.4x: below the default 1.5
    assert straggler([300, 100], [1.0, 1.0]) == (1, 0, 3.0)          # per example, not per rank
    assert straggler([100, 0], [1.0, 0.0]) is None                   # one measured rank: nobody to compare


def test_a_rank_cut_out_after_a_bad_spell_gets_work_again():
    # 5 ranks sharing 16 examples: a rank at a hundredth of the others' speed ends up with no work, and so
    # with no new measurement; once it is as fast as the others it must win its share back.
    bal = ShardBalancer(5)
    speed = np.array([1.0, 1.0, 0.01, 1.0, 1.0])
    assert run(bal, 16, lambda s: s / speed, 40, quantum=8)[2] == 0
    speed[2] = 1.0
    assert run(bal, 16, lambda s: s / speed, 100, quantum=8).max() <= 4


def test_cuts_move_only_for_a_real_gain():
    # Every rank equally fast, measured with 5% noise: after settling, the cut (and so every shard's
    # shape) changes rarely, and always lands on multiples of 8.
    bal = ShardBalancer(2)
    rng = np.random.default_rng(1)
    seen, moves, last = set(), 0, None
    for step in range(300):
        sizes = np.diff(bal.plan(256, 8))
        bal.observe(sizes, sizes / 1000.0 * rng.uniform(0.95, 1.05, 2))
        if step >= 50:
            seen.add(tuple(sizes))
            moves += last is not None and tuple(sizes) != last
            last = tuple(sizes)
    assert all(s % 8 == 0 for t in seen for s in t) and len(seen) <= 3 and moves <= 10
