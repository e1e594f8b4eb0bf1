"""Uneven shards for unequal ranks (`--balance`): each rank's share of the next global batch follows its speed.

A synchronized step lasts as long as its slowest rank. On a shared machine the ranks are rarely equally
fast (a vCPU whose host is busier, two ranks time-sharing one core, a straggling node), so equal shards
leave the fast ranks waiting in the allreduce. With --balance every rank reports the seconds it spent
computing its shard (in the step's own allreduce: no extra message), and every rank derives the same
next split from the same figures:

    speed_r  = examples_r / seconds_r               measured this step, for every rank that had work
    w_r      = (1 - a) * w_r + a * speed_r          smoothed (a = SMOOTHING), first measurement taken as is
    w_r      = clip(w_r, median(w) / 4, median(w) * 4)    one bad step cannot starve or flood a rank
    w_r     += a * (median(w) - w_r)                only for a rank that had no work (so, no measurement)
    target   = cuts at the multiples of `quantum` nearest n * (w_0 + ... + w_r) / sum(w)
    cuts     = target, but only if max_r(shard_r / w_r), the predicted step time, is 3% shorter with it

Cuts on multiples of the quantum, moved only for a real gain, keep the shard shapes few and steady: every
new shape costs fresh scratch arrays (page faults) in the layers. A rank that got no work (so no new measurement) drifts back towards the
median weight, so that it wins work back once it is fast again.

The fixed point gives every rank the same compute time. It stays stable when two ranks share a core: the
one given more work finishes later and measures slower, so work flows back. The gradient is still the
exact sum over the whole global batch; only the order of float additions changes with the cut, so results
stay equal to equal shards' up to float rounding, but not bit for bit between two runs: the cut follows
the clock. In deterministic mode the items are whole micro-batches, and moving them changes no bit.
"""
from __future__ import annotations

import numpy as np

from lenet_dist.data import sampler

SMOOTHING = 0.2          # weight of the newest measurement
MAX_SPREAD = 4.0         # no weight beyond [median / 4, median * 4]
MIN_GAIN = 0.03          # the cut moves only for a step predicted at least 3% shorter


class ShardBalancer:
    def __init__(self, size, enabled=True):
        self.size, self.enabled = size, enabled and size > 1
        self.weights = np.zeros(size, np.float64)        # smoothed items/s; 0 = not measured yet
        self._cuts = {}                                  # n -> the cuts in force for batches of n items
        self._equal_cuts = {}                            # n -> equal shards' cuts

    def plan(self, n, quantum=1):
        """Cuts (size + 1,) int64, from 0 to n: rank r takes items [cuts[r], cuts[r + 1]) of this step's n.
        Cuts fall on multiples of `quantum` (less for batches too small to share out that coarsely)."""
        if not self.enabled or not (self.weights > 0).all():
            return self._equal(n)
        q = max(1, min(quantum, n // (4 * self.size)))
        cum = np.cumsum(self.weights)
        target = np.minimum(q * np.floor(n * cum / cum[-1] / q + 0.5), n).astype(np.int64)
        target[-1] = n
        target = np.concatenate([[0], target])
        cuts = self._cuts.get(n)
        if cuts is None:
            cuts = self._equal(n)
        if self._step_time(target) < (1.0 - MIN_GAIN) * self._step_time(cuts):
            cuts = self._cuts[n] = target
        return cuts

    def _equal(self, n):
        """The cuts of equal shards (sampler.shard_bounds), made once per batch size."""
        cuts = self._equal_cuts.get(n)
        if cuts is None:
            cuts = self._equal_cuts[n] = np.array([0] + [sampler.shard_bounds(n, r, self.size)[1]
                                                         for r in range(self.size)], np.int64)
        return cuts

    def _step_time(self, cuts):
        """Predicted time of a step cut this way: the slowest rank's items / speed."""
        return float(np.max(np.diff(cuts) / self.weights))

    def observe(self, sizes, seconds):
        """Fold in one step: items each rank computed and the seconds it took (the same arrays on every rank)."""
        if not self.enabled:
            return
        sizes, seconds = np.asarray(sizes, np.float64), np.asarray(seconds, np.float64)
        seen = (sizes > 0) & (seconds > 0)
        speed = np.divide(sizes, seconds, out=np.zeros_like(sizes), where=seen)
        w = self.weights
        first = seen & (w == 0)
        w[first] = speed[first]
        again = seen & ~first
        w[again] += SMOOTHING * (speed[again] - w[again])
        if (w > 0).all():
            mid = float(np.median(w))
            idle = sizes == 0                # no work, no measurement: drift back towards the median, so a
            w[idle] += SMOOTHING * (mid - w[idle])   # rank cut out after a bad spell gets work and a new say
            np.clip(w, mid / MAX_SPREAD, mid * MAX_SPREAD, out=w)


def straggler(examples, seconds, threshold=1.5):
    """(slow rank, fast rank, how many times slower) when some rank computed at least `threshold` times
    slower per example than the fastest one over the counted steps; None otherwise."""
    examples, seconds = np.asarray(examples, np.float64), np.asarray(seconds, np.float64)
    ok = (examples > 0) & (seconds > 0)
    if ok.sum() < 2:
        return None
    speed = np.where(ok, examples / np.where(ok, seconds, 1.0), np.nan)
    slow, fast = int(np.nanargmin(speed)), int(np.nanargmax(speed))
    ratio = float(speed[fast] / speed[slow])
    return (slow, fast, ratio) if ratio >= threshold else None

