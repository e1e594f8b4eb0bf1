"""The bucketed allreduce: the gradient is summed over the ranks in buckets, each started (non-blocking) as
soon as backward has produced it, so that the fully connected layers' gradients (80% of the bytes, and
backward produces them first) travel while the convolutions' backward still computes (and, pipelined,
the next step's convolutions' forward: BucketedAllreduce).

    grad buffer  [conv1 | conv2 | fc1 | fc2 | fc3 | tail]   flat, in PARAM_SPECS order
    backward      <-- fc3, fc2, fc1, conv2, conv1            model.backward calls ready(offset) after each
    buckets       whole layers from the end, closed once a bucket holds >= bucket_kb KiB of float32
    tail          (loss, correct, stop, seconds, ...)       started last, once the step knows all of it

The buckets follow from the bucket size alone, so every rank starts the same collectives in the same order,
as MPI requires. Each element is the same sum as in the fused path: exactly so in fixed point
(--deterministic: the buffer is the int64 one), within float rounding in float32 (MPI may add the ranks in
another order for a smaller message).

Half precision (--allreduce-dtype float16 | bfloat16) is a subclass: compressed.CompressedAllreduce.
"""
from __future__ import annotations

from collections import deque

import numpy as np

from lenet_dist.nn.model import NUM_PARAMS, PARAM_SPECS

# 64 KiB gives two buckets, fc1..fc3 (236 KiB, started after fc1's backward) and conv1..conv2 (10 KiB,
# after conv1's): as fast as any other cut on slow links (docs/scaling.md).
BUCKET_KB_DEFAULT = 64
CHUNK_KB_DEFAULT = 128  # the back lane: chunks on the wire, how many under way (chosen: docs/scaling.md)
WINDOW_DEFAULT = 1


def layer_starts():
    """Flat offset where each layer's gradients start (its weight), first layer first: 0, 156, 2572, ..."""
    starts, off = [], 0
    for name, shape in PARAM_SPECS:
        if name.endswith(".weight"):
            starts.append(off)
        off += int(np.prod(shape))
    return starts


def plan(bucket_kb):
    """[(lo, hi), ...] flat ranges of the gradient in the order backward completes them (the last layers
    first): whole layers taken from the end until a bucket holds >= bucket_kb KiB of float32."""
    out, hi = [], NUM_PARAMS
    for lo in reversed(layer_starts()):
        if (hi - lo) * 4 >= bucket_kb * 1024 or lo == 0:
            out.append((lo, hi))
            hi = lo
    return out


def tail_slots(bucket_kb, dtype):
    """Tail slots the reducer needs in the grad buffer beyond the trainer's: one bound per bucket when
    compressing, none otherwise."""
    return 0 if dtype == "float32" else len(plan(bucket_kb))


class BucketedAllreduce:
    """One step: backward calls ready(offset) as layers finish; the step calls finish() once its tail is
    written, then settle() before anything reads the later layers' sums. After finish(), the front bucket's
    range [0, back_lo) and the tail hold the sums over all ranks; after settle(), the rest does too.

    Two lanes, each a communicator of its own (MPI orders collectives per communicator only):
        front   the bucket with the first layers (conv1, conv2) and the tail, started at once
        back    every other bucket (fc1..fc3), in chunks of chunk_kb KiB on the wire, at most `window` of
                them under way
    The next step's forward needs the first layers' weights first, and the last layers' only after the
    convolutions have run. So the trainer updates [0, back_lo) as soon as finish() returns and the rest just
    before fc1's forward (settle()): the fully connected gradients travel during the convolutions'
    backward AND the next step's convolutions' forward. The window keeps the back lane from queueing more
    than a few chunks ahead of the front bucket in the one connection both share (TCP delivers in order: a
    whole 236 KiB bucket queued first holds the 10 KiB front bucket back by its full transfer time)."""

    def __init__(self, comm, buf, *, bucket_kb, pipelined=True, chunk_kb=None, window=None):
        """`buf`: what is summed, NUM_PARAMS gradients then the tail (float32; --deterministic: the int64
        fixed-point sums). `chunk_kb`, `window`: the back lane's chunk size on the wire and chunks under way
        (defaults: CHUNK_KB_DEFAULT, WINDOW_DEFAULT; window 0: no limit). `pipelined` False (the caller
        settles right after finish()): each bucket whole, all at once, as nothing runs between the two."""
        self.comm, self.buf = comm, buf
        self.buckets = plan(bucket_kb)
        self.back_lo = self.buckets[-1][1]                      # [0, back_lo): the front bucket
        self.chunk_kb = (CHUNK_KB_DEFAULT if pipelined else 1 << 30) if chunk_kb is None else chunk_kb
        window = (WINDOW_DEFAULT if pipelined else 0) if window is None else window
        self.front = Lane(comm.lane())
        self.back = Lane(comm.lane(), window)
        nb = len(self.buckets)
        self._lanes = [self.back] * (nb - 1) + [self.front]
        self._plain = [self._ops(i, buf, None) for i in range(nb)]    # float32 (or int64) sums
        self._tail = _Sum(self.front.comm, buf[NUM_PARAMS:], "float32")
        self._next = 0                                                  # buckets started this step
        self._unsettled = []                                            # back buckets started, not decoded

    def _ops(self, i, values, how):
        """The collectives that sum bucket i of `values`: one for the front bucket, chunks for the back.
        `how`: None (MPI's own sum, in the buffer's type), a half dtype (MPI sums in half), or a class
        making one sum of a range (compressed.HalfSum)."""
        lo, hi = self.buckets[i]
        lane = self._lanes[i]
        step = hi - lo if lane is self.front else max(1, self.chunk_kb * 1024 // values.itemsize)
        cuts = list(range(lo, hi, step)) + [hi]
        if callable(how):
            return [how(lane.comm, a, b, values[a:b]) for a, b in zip(cuts, cuts[1:])]
        return [_Sum(lane.comm, values[a:b], how or "float32") for a, b in zip(cuts, cuts[1:])]

    def ready(self, offset):
        """Backward has finished every gradient from flat `offset` on: start the buckets that covers, and let
        MPI move the ones under way (MPICH progresses only inside MPI calls)."""
        while self._next < len(self.buckets) and self.buckets[self._next][0] >= offset:
            self._start(self._next)
            self._next += 1
        self.pump()

    def pump(self):
        """Let MPI move what is under way, and start back chunks as the window frees, but none while the
        front lane has work: what starts now queues ahead of it on the wire."""
        self.front.pump()
        if not self.front.busy:
            self.back.pump()

    def finish(self):
        """Start what is left (all of it on a rank that computed nothing), then the tail; wait for the front
        lane. The back lane goes on: settle() waits for it."""
        self.ready(0)
        self._before_tail()
        self.front.add([self._tail])
        self.front.drain()
        self.back.pump()                                        # the back lane's turn again
        self._next = 0
        self._front_summed(len(self.buckets) - 1)

    def settle(self):
        """Wait for the back lane; its sums are then in `buf`."""
        self.back.drain()
        for i in self._unsettled:
            self._summed(i)
        self._unsettled = []

    def _start(self, i):
        lane = self._lanes[i]
        if lane is self.back:
            self._unsettled.append(i)
        lane.add(self._send(i))

    # What a subclass that encodes the buckets (compressed.CompressedAllreduce) changes: here, nothing.
    def _send(self, i):
        """The collectives that carry bucket i this step (--timeline wraps this and _tail: timeline.py)."""
        return self._plain[i]

    def _before_tail(self):
        """The tail is about to leave: last figures into it."""

    def _front_summed(self, i):
        """The front bucket i and the tail are summed."""

    def _summed(self, i):
        """Back bucket i is summed."""


class Lane:
    """Collectives of one priority on a communicator of their own (comm.lane()): started in the order they
    were added, at most `window` under way (None or 0: no limit), completed in that order. Only the oldest one is
    tested: MPI progresses all of them inside any call, and HalfSum's allgathers must start in lane order."""

    def __init__(self, comm, window=None):
        self.comm, self.window = comm, window or None
        self.waiting, self.flight = deque(), deque()

    @property
    def busy(self):
        return bool(self.flight or self.waiting)

    def add(self, ops):
        """Queue `ops` (started in turn by pump(), which the caller runs)."""
        self.waiting.extend(ops)

    def pump(self):
        while self.flight and self.flight[0].test():
            self.flight.popleft()
        while self.waiting and (self.window is None or len(self.flight) < self.window):
            op = self.waiting.popleft()
            op.start()
            self.flight.append(op)

    def drain(self):
        while self.flight or self.waiting:
            if self.flight:
                self.flight.popleft().wait()
            self.pump()


class _Sum:
    """An in-place sum of `values` over the ranks (MPI's own; dtype float16 | bfloat16: `values` hold
    half-precision values, summed by MPI in half)."""

    def __init__(self, comm, values, dtype):
        self.comm, self.values, self.dtype, self.request = comm, values, dtype, None

    def start(self):
        self.request = self.comm.iallreduce_(self.values, self.dtype)

    def test(self):
        return self.comm.test_all([self.request])

    def wait(self):
        self.comm.wait_all([self.request])
