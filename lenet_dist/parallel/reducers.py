"""Ways of summing the step's gradient and statistics over the ranks, behind one interface.

The step (step.py) calls, in this order, and knows nothing else about how the sum is made:

    bind(buf, tail)          once: the flat buffer (NUM_PARAMS gradients, then the statistics' tail)
    share(workspaces)        once: the step's scratch (layers.Workspace), which a reducer may back with
                             memory shared with ranks that compute at other times (turns.py)
    begin()                  a step starts
    pieces(lo, hi)           the pieces its shard [lo, hi) is computed in (one, or micro-batches)
    before(offset)           forward is about to use the weights from flat `offset` on (None: not needed)
    ready(offset)            backward has finished every gradient from flat `offset` on
    add(loss, correct)       a piece is done; its gradient is in the buffer
    sum(stop, seconds)       -> StepStats over all ranks; the gradient sums are in the buffer
    update(apply)            apply(part) for each part of the gradient as its sum is there (now, or at settle)
    settle()                 whatever is still owed is done: before anything reads the parameters
    state() / takes(saved) / load_state(residual, scales)    what a checkpoint keeps to resume bit for bit

`before` and `ready` are the only calls the model makes into distribution code (model.py).
Here: the fused sum (one allreduce after backward), the bucketed sum (buckets.py: buckets started during
backward; pipelined or not), the same in half precision with error feedback (compressed.py), and a
straggler for fault rehearsal. fixedpoint.py and autotune.py wrap these.
"""
from __future__ import annotations

import time

from lenet_dist.nn.model import NUM_PARAMS
from lenet_dist.parallel.buckets import BUCKET_KB_DEFAULT, BucketedAllreduce, tail_slots
from lenet_dist.parallel.compressed import CompressedAllreduce

EVERYTHING = slice(0, NUM_PARAMS)


class Reducer:
    """The interface, and what the ways of summing share: one piece per shard, the step's figures written
    to the tail before the collective and read back after it, the whole update at once."""

    path = "fused"              # "fused" | "buckets": the epoch rows' `allreduce`
    name = "fused"              # how, in words: the epoch rows' `reduction`
    pipelined = False
    tail_slots = 0              # the reducer's own slots in the tail
    before = None               # forward's hook (pipelined only)
    waited = 0.0                # seconds this step's forward waited in before(): not compute time
    chooser = None              # autotune.PathChooser when the run measures its path

    def __init__(self, comm):
        self.comm = comm
        self._added = None

    @property
    def description(self):
        return self.name

    def bind(self, buf, tail):
        self.buf, self.tail = buf, tail

    def share(self, workspaces):
        pass

    def begin(self):
        self._added = None

    def pieces(self, lo, hi):
        return ((lo, hi),) if hi > lo else ()

    def ready(self, offset):
        pass

    def add(self, loss, correct):
        self._added = (loss, correct)

    def sum(self, stop, seconds):
        if self._added is None:                 # no examples on this rank: it adds zeros
            self.settle()                       # (what is owed reads the buffer)
            self.buf[:NUM_PARAMS] = 0.0
            self._added = (0.0, 0)
        self.tail.write(self.buf, self.comm.rank, *self._added, stop, seconds)
        self.reduce()
        return self.tail.read(self.buf)

    def reduce(self):
        """Sum the bound buffer over the ranks, at least the tail and the gradients update() applies now."""
        raise NotImplementedError

    def update(self, apply):
        apply(EVERYTHING)

    def settle(self):
        pass

    def state(self):
        """(this rank's residual, description) when the sum carries state from step to step, else None."""
        return None

    def takes(self, saved):
        return False


class FusedReducer(Reducer):
    """One allreduce of the whole buffer after backward; `nonblocking`: started and waited for at once
    (the same sum; on one node MPICH's non-blocking path keeps its pace beside a busy process)."""

    def __init__(self, comm, nonblocking=False):
        super().__init__(comm)
        self.nonblocking = nonblocking
        self.name = "fused, non-blocking" if nonblocking else "fused"

    def reduce(self):
        self.comm.allreduce_(self.buf, nonblocking=self.nonblocking)


class BucketedReducer(Reducer):
    """Buckets started as backward finishes them (buckets.BucketedAllreduce).

    Pipelined: the step waits only for the first layers' bucket and the tail, updates conv1..conv2 at once,
    and owes the update of fc1..fc3 until the next forward reaches fc1 (before()), so their sums travel
    during the convolutions' backward and the next step's convolutions' forward. Each parameter gets the
    same update from the same sum as in the serial order, bit for bit. `chunk_kb`, `window`: how the back
    lane travels (benchmarks and tests; buckets.py)."""

    path = "buckets"

    def __init__(self, comm, bucket_kb=BUCKET_KB_DEFAULT, pipelined=False, chunk_kb=None, window=None):
        super().__init__(comm)
        self.bucket_kb, self.pipelined = bucket_kb, pipelined
        self._lanes = dict(bucket_kb=bucket_kb, pipelined=pipelined, chunk_kb=chunk_kb, window=window)
        self.name = "buckets, pipelined" if pipelined else "buckets"
        self.before = self._before_layer if pipelined else None
        self._owed = None                       # pipelined: apply(), owed to [back_lo, NUM_PARAMS)

    @property
    def description(self):
        return f"{self.name}, {self.bucket_kb} KiB buckets"

    def bind(self, buf, tail):
        super().bind(buf, tail)
        self.engine = BucketedAllreduce(self.comm, buf, **self._lanes)
        self.buckets = self.engine.buckets

    def begin(self):
        super().begin()
        self.waited = 0.0

    def ready(self, offset):
        self.engine.ready(offset)

    def reduce(self):
        self.engine.finish()
        if not self.pipelined:
            self.engine.settle()

    def update(self, apply):
        back_lo = self.engine.back_lo
        if self.pipelined and back_lo < NUM_PARAMS:
            apply(slice(0, back_lo))            # the first layers now, the rest when needed
            self._owed = apply
        else:
            apply(EVERYTHING)

    def _before_layer(self, offset):
        """Forward is about to use the weights from `offset` on: if they are owed an update, wait for their
        sums and apply it; otherwise let MPI move the sums along."""
        if self._owed is not None and offset >= self.engine.back_lo:
            t = time.perf_counter()
            self.settle()
            self.waited += time.perf_counter() - t
        else:
            self.engine.pump()

    def settle(self):
        if self._owed is None:
            return
        apply, self._owed = self._owed, None
        self.engine.settle()
        apply(slice(self.engine.back_lo, NUM_PARAMS))



class HalfPrecisionReducer(BucketedReducer):
    """The buckets in `dtype` (float16 | bfloat16), rounded with error feedback (compressed.py): each rank's
    residual and the agreed scales are state a checkpoint keeps."""

    def __init__(self, comm, bucket_kb=BUCKET_KB_DEFAULT, dtype="float16", pipelined=False, chunk_kb=None,
                 window=None):
        super().__init__(comm, bucket_kb, pipelined, chunk_kb, window)
        self.dtype = dtype
        self.tail_slots = tail_slots(bucket_kb, dtype)

    def bind(self, buf, tail):
        Reducer.bind(self, buf, tail)
        self.engine = CompressedAllreduce(self.comm, buf, dtype=self.dtype, bounds=tail.extra, **self._lanes)
        self.buckets = self.engine.buckets

    def state(self):
        return self.engine.state()

    def takes(self, saved):
        return self.engine.takes(saved)

    def load_state(self, residual, scales):
        self.engine.load_state(residual, scales)


class Straggler:
    """Fault rehearsal (--fault RANK:STEP:slow, bench/scaling.py --straggler): this rank computes `factor`
    times slower. Wraps the run's reducer once the fault fires, so the product's step never sees it."""

    def __init__(self, reducer, factor):
        self.reducer, self.factor = reducer, factor

    def __getattr__(self, name):
        return getattr(self.reducer, name)

    def sum(self, stop, seconds):
        time.sleep((self.factor - 1.0) * seconds)
        return self.reducer.sum(stop, self.factor * seconds)
