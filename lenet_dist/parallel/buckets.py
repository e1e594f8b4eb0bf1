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
(--deterministic: `send` is the int64 buffer), within float rounding in float32 (MPI may add the ranks in
another order for a smaller message).

Compression (dtype float16 | bfloat16, halfprec.py): a bucket is rounded to half precision with a
power-of-two scale every rank agrees on and with error feedback. The scale comes from the previous step's
bound (each rank's largest |g| in the bucket, summed over ranks: extra tail slots), which every rank holds
bit for bit. A bucket without a bound yet (the first step) travels in float32; one whose half sum
overflowed (every rank sees the same inf) is summed again in float32. With 2 ranks, or one rank per
node, the halves are summed by HalfSum: an all-to-all gives rank r the r-th chunk of every rank's bucket,
rank r adds them in float32 and rounds once, and an allgather hands every rank every summed chunk: the
bytes of MPI's reduce-scatter + allgather, without its half-precision additions (MPICH's float16 sum is
slow, and bfloat16 needs a Python user op). With several ranks on a node MPI's own allreduce
sums in half: its recursive halving keeps a node's first exchanges inside the node, where an all-to-all
would send twice the bytes across the link.
"""
from __future__ import annotations

from collections import deque

import numpy as np

from . import halfprec
from ..model import NUM_PARAMS, PARAM_SPECS

U16 = np.uint16         # half-precision values travel as their bits

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

    def __init__(self, comm, buf, *, bucket_kb, dtype="float32", send=None, pipelined=True, chunk_kb=None,
                 window=None):
        """`buf`: the float32 grad buffer (NUM_PARAMS gradients, then the tail). `send`: what travels when it
        is not `buf` itself (--deterministic: the int64 fixed-point sums, filled by the caller).
        `chunk_kb`, `window`: the back lane's chunk size on the wire and chunks under way (defaults:
        CHUNK_KB_DEFAULT, WINDOW_DEFAULT; window 0: no limit). `pipelined` False (the caller settles right
        after finish()): each bucket whole, all at once, as nothing runs between the two."""
        if dtype not in halfprec.DTYPES:
            raise ValueError(f"allreduce dtype must be one of {', '.join(halfprec.DTYPES)}, got {dtype!r}")
        self.comm, self.buf, self.dtype = comm, buf, dtype
        self.send = buf if send is None else send
        self.buckets = plan(bucket_kb)
        self.back_lo = self.buckets[-1][1]                      # [0, back_lo): the front bucket
        self.compress = dtype != "float32"
        assert not (self.compress and send is not None), "compression works on the float32 buffer"
        chunk_kb = (CHUNK_KB_DEFAULT if pipelined else 1 << 30) if chunk_kb is None else chunk_kb
        window = (WINDOW_DEFAULT if pipelined else 0) if window is None else window
        self.front = Lane(comm.lane())
        self.back = Lane(comm.lane(), window)
        nb = len(self.buckets)
        self._lanes = [self.back] * (nb - 1) + [self.front]
        self._plain = [self._ops(i, self.send, None, chunk_kb) for i in range(nb)]   # float32 (or int64) sums
        if self.compress:
            self.half = np.zeros(NUM_PARAMS, halfprec.STORAGE[dtype])   # what travels
            self.residual = np.zeros(NUM_PARAMS, np.float32)            # error feedback, this rank's own
            self.scale = [None] * nb                                    # agreed: from the reduced bounds
            self._sent_scale = [None] * nb                              # the scale each bucket went with
            self.local_bound = np.zeros(nb, np.float32)                 # this rank's max |g| per bucket
            self.bound_slots = slice(len(buf) - nb, len(buf))           # where they travel (the tail's end)
            self.overflows = 0                                          # buckets summed again in float32
            # HalfSum's all-to-all crosses the links with as many bytes as MPI's reduce-scatter only when
            # each node holds one rank (or there are just 2): with 2 ranks per host it sends twice as many
            # (MPI's recursive halving pairs a host's ranks first). Elsewhere MPI sums in half itself.
            halfsum = comm.size == 2 or comm.ranks_per_node == 1
            self._halves = [self._ops(i, self.half, "halfsum" if halfsum else dtype, chunk_kb) for i in range(nb)]
        self._tail = _Sum(self.front.comm, self.send[NUM_PARAMS:], "float32")
        self._next = 0                                                  # buckets started this step
        self._unsettled = []                                            # back buckets started, not decoded

    def _ops(self, i, values, how, chunk_kb):
        """The collectives that sum bucket i of `values`: one for the front bucket, chunks for the back."""
        lo, hi = self.buckets[i]
        lane = self._lanes[i]
        step = hi - lo if lane is self.front else max(1, chunk_kb * 1024 // values.itemsize)
        cuts = list(range(lo, hi, step)) + [hi]
        if how == "halfsum":
            return [HalfSum(lane.comm, a, b, self.dtype, source=values[a:b].view(U16)) for a, b in zip(cuts, cuts[1:])]
        return [_Sum(lane.comm, values[a:b], how or "float32") for a, b in zip(cuts, cuts[1:])]

    def compression_state(self):
        """(this rank's residual, {dtype, buckets, the agreed scale of each bucket: None where the next step
        sends float32}): what a checkpoint keeps so that a resumed run rounds as the uninterrupted one
        would. Settled only."""
        assert self.compress and not self._unsettled
        return self.residual, {"dtype": self.dtype, "buckets": [list(b) for b in self.buckets],
                               "scale": list(self.scale)}

    def takes(self, saved):
        """Whether a compression_state() description fits this reducer (the same dtype and buckets): each
        rank can then take its own residual back."""
        return (self.compress and saved.get("dtype") == self.dtype
                and saved.get("buckets") == [list(b) for b in self.buckets])

    def load_compression_state(self, residual, scales):
        """Go on from a checkpoint's compression_state() (this rank's residual; `scales` None: unknown, the
        next step sends float32)."""
        self.residual[:] = residual
        self.scale = list(scales) if scales is not None else [None] * len(self.buckets)

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
        if self.compress:
            self.buf[self.bound_slots] = self.local_bound
        self.front.add([self._tail])
        self.front.drain()
        self.back.pump()                                        # the back lane's turn again
        self._next = 0
        front = len(self.buckets) - 1
        if self.compress:
            self._decode(front)
            self.scale = [halfprec.agreed_scale(float(b), self.dtype) for b in self.buf[self.bound_slots]]

    def settle(self):
        """Wait for the back lane; its sums are then in `buf`."""
        self.back.drain()
        for i in self._unsettled:
            if self.compress:
                self._decode(i)
        self._unsettled = []

    def _start(self, i):
        lane = self._lanes[i]
        if lane is self.back:
            self._unsettled.append(i)
        if not self.compress:
            lane.add(self._plain[i])
            return
        lo, hi = self.buckets[i]
        g, scale = self.buf[lo:hi], self.scale[i]
        self._sent_scale[i] = scale
        if scale is None:                                       # no agreed scale yet: this time in float32
            g += self.residual[lo:hi]
            self.residual[lo:hi] = 0.0
            lane.add(self._plain[i])
        else:
            halfprec.encode(g, self.residual[lo:hi], scale, self.dtype, out=self.half[lo:hi])
            lane.add(self._halves[i])
        self.local_bound[i] = np.abs(g).max()                  # of what was sent, residual included

    def _decode(self, i):
        """Bucket i's half sum back into buf as float32 (nothing to do if it travelled in float32)."""
        lo, hi = self.buckets[i]
        scale = self._sent_scale[i]
        if scale is None:
            return                                              # buf holds the float32 sum already
        if halfprec.all_finite(self.half[lo:hi], self.dtype):
            halfprec.decode(self.half[lo:hi], scale, self.dtype, out=self.buf[lo:hi])
        else:                           # a sum overflowed, on every rank alike: again, in float32
            self.residual[lo:hi] = 0.0                          # buf[lo:hi] still holds what was rounded
            self._lanes[i].comm.allreduce_(self.buf[lo:hi])
            self.overflows += 1


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


class HalfSum:
    """The sum over the ranks of one bucket of half-precision values (their bits, uint16), in two non-blocking
    steps: an all-to-all hands rank r the r-th chunk of every rank's bucket; rank r adds them up in float32
    (in rank order, so the result does not depend on timing) and rounds once; an allgather gives every
    rank every summed chunk. MPI progresses the steps only inside MPI calls: test() moves one along.

    MPI wants every rank to start its collectives in the same order on a communicator. The all-to-alls go
    on the lane's communicator in lane order; the allgathers on its duplicate (comm.iallgather_), each
    started only after the previous sum's, so their order is the lane order too, whichever all-to-all
    happens to finish first."""

    def __init__(self, comm, lo, hi, dtype, source=None):
        """The bucket's flat range [lo, hi) of the gradient; dtype float16 | bfloat16. `source`: the bits
        start() sends when given none, overwritten with the sum when done (in place, like MPI's)."""
        p, n = comm.size, hi - lo
        self.comm, self.lo, self.hi, self.n, self.dtype, self.source = comm, lo, hi, n, dtype, source
        c = -(-n // p)                                          # chunk: the bucket padded to p chunks
        self.send = np.zeros(p * c, U16)                        # the padding stays zero
        self.recv = np.empty((p, c), U16)                       # chunk r of every rank, on rank r
        self.mine = np.empty(c, U16)                            # their sum, rounded to half
        self.gathered = np.empty(p * c, U16)
        self.request, self.step = None, 0                       # 1: all-to-all under way, 2: allgather, 3: done

    def start(self, bits=None):
        self.send[:self.n] = self.source if bits is None else bits
        self.request, self.step = self.comm.ialltoall_(self.send, self.recv), 1

    @property
    def result(self):
        return self.gathered[:self.n]

    @staticmethod
    def sum_halves(recv, dtype):
        """(p, c) half-precision bits, one row per rank -> their sum over the rows in float32, rounded once
        to half (bits, (c,))."""
        parts = recv.view(np.float16).astype(np.float32) if dtype == "float16" else halfprec.from_bfloat16(recv)
        total = parts.sum(axis=0, dtype=np.float32)
        return halfprec.to_float16(total).view(U16) if dtype == "float16" else halfprec.to_bfloat16(total)

    def _reduce_and_gather(self):
        self.mine[...] = self.sum_halves(self.recv, self.dtype)
        self.request, self.step = self.comm.iallgather_(self.mine, self.gathered), 2

    def _done(self):
        self.step = 3
        if self.source is not None:
            self.source[...] = self.result

    def test(self):
        """Move this sum along without waiting; True once it is done."""
        if self.step == 1:
            if not self.comm.test_all([self.request]):
                return False
            self._reduce_and_gather()
        if self.step == 2 and self.comm.test_all([self.request]):
            self._done()
        return self.step == 3

    def wait(self):
        if self.step == 1:
            self.comm.wait_all([self.request])
            self._reduce_and_gather()
        if self.step == 2:
            self.comm.wait_all([self.request])
            self._done()
