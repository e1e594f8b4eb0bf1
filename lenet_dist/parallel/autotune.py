"""The allreduce path chosen by measuring both on the run itself (`--bucket-kb -1`).

Which of the two reductions is faster depends on where the ranks are (the link, a busy neighbour), not
on the model (measurements: docs/scaling.md). So the first steps of a run try both, in interleaved
blocks, and the run keeps the faster:

    steps [0, WARMUP)                  buckets (scratch arrays, caches, MPI connections warm up)
    then BLOCKS blocks of BLOCK steps   fused, buckets, fused, buckets, ... (the same on every rank)
    decision                           median block time per path, summed over the ranks in one
                                       allreduce, so every rank decides the same; fused only if it is
                                       at least MARGIN faster (overlap is the better bet on a busy link)

A block's time runs from its first step to its last step's end, owed update settled, so a pipelined
step's tail is charged to its own path. Both paths give every parameter the same sum (within float
rounding; exactly in --deterministic mode), so switching mid-run changes nothing but the speed. But the
choice follows the clock: with 3 or more ranks two runs of the same seed may differ in the last bits (MPI
adds the ranks in another order on each path), as with --balance; that is why it is not the default (which
decides by placement, placement.py). A run too short to finish the trial keeps the buckets.
AutoReducer runs the trial: it hands each step to the fused or the bucketed reducer.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

WARMUP = 10
BLOCK = 8
BLOCKS = 6                 # three of each path
MARGIN = 0.02
PATHS = ("fused", "buckets")


class PathChooser:
    def __init__(self, comm, clock=time.perf_counter):
        self.comm, self.clock = comm, clock
        self.decided = None                    # "fused" | "buckets" once the trial is over
        self.block_seconds = {p: [] for p in PATHS}
        self._t0 = None

    @property
    def trial_steps(self):
        return WARMUP + BLOCK * BLOCKS

    def path(self, step):
        """The path of step `step`, counted from this start of the run (a resumed run tries again): the
        same on every rank."""
        if self.decided is not None:
            return self.decided
        if step < WARMUP or step >= self.trial_steps:
            return "buckets"
        return PATHS[((step - WARMUP) // BLOCK) % 2]

    def step_starts(self, step):
        if self.decided is None and WARMUP <= step < self.trial_steps and (step - WARMUP) % BLOCK == 0:
            self._t0 = self.clock()

    def step_ends(self, step, settle):
        """After step `step`; `settle()` completes what the step still owes (the block's time includes it).
        Returns the decision when this step ends the trial, else None."""
        if self.decided is not None or not WARMUP <= step < self.trial_steps or (step - WARMUP) % BLOCK != BLOCK - 1:
            return None
        settle()
        self.block_seconds[self.path(step)].append(self.clock() - self._t0)
        if step != self.trial_steps - 1:
            return None
        mine = np.array([statistics.median(self.block_seconds[p]) for p in PATHS], np.float64)
        total = self.comm.allreduce_(mine)                         # [dist] the same figures on every rank
        self.decided = "fused" if total[0] < (1 - MARGIN) * total[1] else "buckets"
        self.medians = {p: float(v) / self.comm.size / BLOCK for p, v in zip(PATHS, total)}  # s per step
        return self.decided


class AutoReducer:
    """Each step to `fused` or `buckets` (reducers.py, bound to the same buffer), as the chooser says."""

    def __init__(self, fused, buckets, clock=time.perf_counter):
        self.fused, self.buckets = fused, buckets
        self.chooser = PathChooser(fused.comm, clock)
        self.active = buckets
        self.tail_slots = buckets.tail_slots
        self._steps = 0                 # steps since this start (the chooser's clock)

    def __getattr__(self, name):        # path, name, pipelined, before, waited, ready, ...: the active one's
        return getattr(self.active, name)

    def bind(self, buf, tail):
        self.fused.bind(buf, tail)
        self.buckets.bind(buf, tail)

    def begin(self):
        chosen = self.buckets if self.chooser.path(self._steps) == "buckets" else self.fused
        if chosen is not self.active:
            self.active.settle()
            self.active = chosen
        self.chooser.step_starts(self._steps)
        self.active.begin()

    def update(self, apply):
        self.active.update(apply)
        decided = self.chooser.step_ends(self._steps, self.active.settle)
        if decided:
            self.active = self.buckets if decided == "buckets" else self.fused
        self._steps += 1

    def settle(self):
        self.active.settle()
