"""The bucketed allreduce: the gradient is summed over the ranks in buckets, each started (non-blocking) as
soon as backward has produced it and all waited for before the SGD step, so that the fully connected
layers' gradients (80% of the bytes, and backward produces them first) travel while the convolutions'
backward still computes.

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
bytes of MPI's reduce-scatter + allgather, without its half-precision additions (MPICH's float16 sum took
0.58 ms a step, and bfloat16 needs a Python user op). With several ranks on a node MPI's own allreduce
sums in half: its recursive halving keeps a node's first exchanges inside the node, where an all-to-all
would send twice the bytes across the link.
"""
from __future__ import annotations

import numpy as np

from . import halfprec
from .model import NUM_PARAMS, PARAM_SPECS

U16 = np.uint16         # half-precision values travel as their bits

# Measured (docs/scaling.md): 64 KiB gives two buckets, fc1..fc3 (236 KiB, started after fc1's backward)
# and conv1..conv2 (10 KiB, after conv1's), as fast as any other cut on slow links, and as the fused
# allreduce on loopback.
BUCKET_KB_DEFAULT = 64


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
    written. After finish(), `send` (and `buf`) hold the sums over all ranks."""

    def __init__(self, comm, buf, *, bucket_kb, dtype="float32", send=None):
        """`buf`: the float32 grad buffer (NUM_PARAMS gradients, then the tail). `send`: what travels when it
        is not `buf` itself (--deterministic: the int64 fixed-point sums, filled by the caller)."""
        if dtype not in halfprec.DTYPES:
            raise ValueError(f"allreduce dtype must be one of {', '.join(halfprec.DTYPES)}, got {dtype!r}")
        self.comm, self.buf, self.dtype = comm, buf, dtype
        self.send = buf if send is None else send
        self.buckets = plan(bucket_kb)
        self.compress = dtype != "float32"
        assert not (self.compress and send is not None), "compression works on the float32 buffer"
        if self.compress:
            nb = len(self.buckets)
            self.half = np.zeros(NUM_PARAMS, halfprec.STORAGE[dtype])   # what travels
            self.residual = np.zeros(NUM_PARAMS, np.float32)            # error feedback, this rank's own
            self.scale = [None] * nb                                    # agreed: from the reduced bounds
            self.local_bound = np.zeros(nb, np.float32)                 # this rank's max |g| per bucket
            self.bound_slots = slice(len(buf) - nb, len(buf))           # where they travel (the tail's end)
            self.overflows = 0                                          # buckets summed again in float32
            # HalfSum's all-to-all crosses the links with as many bytes as MPI's reduce-scatter only when
            # each node holds one rank (or there are just 2): with 2 ranks per host it sends twice as many
            # (MPI's recursive halving pairs a host's ranks first). Elsewhere MPI sums in half itself.
            self.sums = [HalfSum(comm, lo, hi, dtype) for lo, hi in self.buckets] \
                if comm.size == 2 or comm.ranks_per_node == 1 else None
        self._next, self._requests, self._halves = 0, [], []        # MPI requests; HalfSums under way

    def ready(self, offset):
        """Backward has finished every gradient from flat `offset` on: start the buckets that covers, and let
        MPI move the ones under way (MPICH progresses only inside MPI calls)."""
        while self._next < len(self.buckets) and self.buckets[self._next][0] >= offset:
            self._start(*self.buckets[self._next], self._next)
            self._next += 1
        self.comm.test_all(self._requests)
        HalfSum.advance(self._halves)

    def finish(self):
        """Start what is left (all of it on a rank that computed nothing), then the tail; wait for all."""
        self.ready(0)
        if self.compress:
            self.buf[self.bound_slots] = self.local_bound
        self._requests.append(self.comm.iallreduce_(self.send[NUM_PARAMS:]))
        HalfSum.wait(self._halves)
        self.comm.wait_all(self._requests)
        for s in self._halves:
            self.half[s.lo:s.hi].view(U16)[...] = s.result
        self._next, self._requests, self._halves = 0, [], []
        if self.compress:
            self._decode()

    def _start(self, lo, hi, i):
        if not self.compress:
            self._requests.append(self.comm.iallreduce_(self.send[lo:hi]))
            return
        g, scale = self.buf[lo:hi], self.scale[i]
        if scale is None:                                       # no agreed scale yet: this time in float32
            g += self.residual[lo:hi]
            self.residual[lo:hi] = 0.0
            self._requests.append(self.comm.iallreduce_(g))
        else:
            halfprec.encode(g, self.residual[lo:hi], scale, self.dtype, out=self.half[lo:hi])
            if self.sums is None:
                self._requests.append(self.comm.iallreduce_(self.half[lo:hi], self.dtype))
            else:
                self.sums[i].start(self.half[lo:hi].view(U16))
                self._halves.append(self.sums[i])
        self.local_bound[i] = np.abs(g).max()                  # of what was sent, residual included

    def _decode(self):
        """The half sums back into buf as float32; the next step's scales from this step's bounds."""
        for i, (lo, hi) in enumerate(self.buckets):
            scale = self.scale[i]
            if scale is None:
                continue                                        # buf holds the float32 sum already
            if halfprec.all_finite(self.half[lo:hi], self.dtype):
                halfprec.decode(self.half[lo:hi], scale, self.dtype, out=self.buf[lo:hi])
            else:                       # a sum overflowed, on every rank alike: again, in float32
                self.residual[lo:hi] = 0.0                      # buf[lo:hi] still holds what was rounded
                self.comm.allreduce_(self.buf[lo:hi])
                self.overflows += 1
        self.scale = [halfprec.agreed_scale(float(b), self.dtype) for b in self.buf[self.bound_slots]]


class HalfSum:
    """The sum over the ranks of one bucket of half-precision values (their bits, uint16), in two non-blocking
    steps: an all-to-all hands rank r the r-th chunk of every rank's bucket; rank r adds them up in float32
    (in rank order, so the result does not depend on timing) and rounds once; an allgather gives every
    rank every summed chunk. MPI progresses the steps only inside MPI calls: advance() moves them along
    between layers, wait() at the end.

    MPI wants every rank to start its collectives in the same order on a communicator. The all-to-alls go
    on the world communicator in bucket order, like everything else; the allgathers go on a duplicate of
    it (comm.iallgather_), each started only after the previous bucket's, so their order is the bucket
    order too, whichever all-to-all happens to finish first."""

    def __init__(self, comm, lo, hi, dtype):
        """The bucket's flat range [lo, hi) of the gradient; dtype float16 | bfloat16."""
        p, n = comm.size, hi - lo
        self.comm, self.lo, self.hi, self.n, self.dtype = comm, lo, hi, n, dtype
        c = -(-n // p)                                          # chunk: the bucket padded to p chunks
        self.send = np.zeros(p * c, U16)                        # the padding stays zero
        self.recv = np.empty((p, c), U16)                       # chunk r of every rank, on rank r
        self.mine = np.empty(c, U16)                            # their sum, rounded to half
        self.gathered = np.empty(p * c, U16)
        self.request, self.step = None, 0                       # 1: all-to-all under way, 2: allgather, 3: done

    def start(self, bits):
        self.send[:self.n] = bits
        self.request, self.step = self.comm.ialltoall_(self.send, self.recv), 1

    @property
    def result(self):
        return self.gathered[:self.n]

    def _reduce_and_gather(self):
        parts = self.recv.view(np.float16).astype(np.float32) if self.dtype == "float16" \
            else halfprec.from_bfloat16(self.recv)                                          # (p, c)
        total = parts.sum(axis=0, dtype=np.float32)
        self.mine[...] = (halfprec.to_float16(total).view(U16) if self.dtype == "float16"
                          else halfprec.to_bfloat16(total))
        self.request, self.step = self.comm.iallgather_(self.mine, self.gathered), 2

    @staticmethod
    def advance(sums):
        """Move every sum along without waiting; allgathers start in bucket order."""
        for s in sums:
            if s.step == 1:
                if not s.comm.test_all([s.request]):
                    return                                      # the later ones wait for this one's turn
                s._reduce_and_gather()
            if s.step == 2 and s.comm.test_all([s.request]):
                s.step = 3

    @staticmethod
    def wait(sums):
        for s in sums:
            if s.step == 1:
                s.comm.wait_all([s.request])
                s._reduce_and_gather()
        for s in sums:
            if s.step == 2:
                s.comm.wait_all([s.request])
                s.step = 3
