"""The bucketed allreduce in half precision (--allreduce-dtype float16 | bfloat16): CompressedAllreduce
rounds each bucket with error feedback (halfprec.py) before it leaves, and HalfSum adds the halves of two
or one-per-node ranks in float32 with one rounding.
"""
from __future__ import annotations

import numpy as np

from lenet_dist.nn.model import NUM_PARAMS
from lenet_dist.parallel.buckets import BucketedAllreduce
from lenet_dist.parallel.halfprec import agreed_scale, all_finite, decode, encode, from_bfloat16, HALF_MAX, STORAGE, to_bfloat16, to_float16

U16 = np.uint16         # half-precision values travel as their bits


class CompressedAllreduce(BucketedAllreduce):
    """A bucket is rounded to half precision with a power-of-two scale every rank agrees on and with error
    feedback. The scale comes from the previous step's bound (each rank's largest |g| in the bucket, summed over ranks: extra tail slots), which every rank holds
    bit for bit. A bucket without a bound yet (the first step) travels in float32; one whose half sum
    overflowed (every rank sees the same inf) is summed again in float32. With 2 ranks, or one rank per
    node, the halves are summed by HalfSum: an all-to-all gives rank r the r-th chunk of every rank's bucket,
    rank r adds them in float32 and rounds once, and an allgather hands every rank every summed chunk: the
    bytes of MPI's reduce-scatter + allgather, without its half-precision additions (MPICH's float16 sum is
    slow, and bfloat16 needs a Python user op). With several ranks on a node MPI's own allreduce
    sums in half: its recursive halving keeps a node's first exchanges inside the node, where an all-to-all
    would send twice the bytes across the link."""

    def __init__(self, comm, buf, *, bucket_kb, dtype, pipelined=True, chunk_kb=None, window=None, bounds=None):
        """`buf`: the float32 grad buffer; `bounds`: the slice of its tail where the buckets' bounds travel
        (buckets.tail_slots of them; default: the buffer's last ones)."""
        if dtype not in HALF_MAX:
            raise ValueError(f"allreduce dtype must be one of {', '.join(HALF_MAX)}, got {dtype!r}")
        super().__init__(comm, buf, bucket_kb=bucket_kb, pipelined=pipelined, chunk_kb=chunk_kb, window=window)
        self.dtype = dtype
        nb = len(self.buckets)
        self.half = np.zeros(NUM_PARAMS, STORAGE[dtype])                # what travels
        self.residual = np.zeros(NUM_PARAMS, np.float32)                # error feedback, this rank's own
        self.scale = [None] * nb                                        # agreed: from the reduced bounds
        self._sent_scale = [None] * nb                                  # the scale each bucket went with
        self.local_bound = np.zeros(nb, np.float32)                     # this rank's max |g| per bucket
        self.bound_slots = slice(len(buf) - nb, len(buf)) if bounds is None else bounds   # where they travel
        self.overflows = 0                                              # buckets summed again in float32
        # HalfSum's all-to-all crosses the links with as many bytes as MPI's reduce-scatter only when
        # each node holds one rank (or there are just 2): with 2 ranks per host it sends twice as many
        # (MPI's recursive halving pairs a host's ranks first). Elsewhere MPI sums in half itself.
        if comm.size == 2 or comm.ranks_per_node == 1:
            how = lambda c, a, b, values: HalfSum(c, a, b, dtype, source=values.view(U16))  # noqa: E731
        else:
            how = dtype
        self._halves = [self._ops(i, self.half, how) for i in range(nb)]

    def state(self):
        """(this rank's residual, {dtype, buckets, the agreed scale of each bucket: None where the next step
        sends float32}): what a checkpoint keeps so that a resumed run rounds as the uninterrupted one
        would. Settled only."""
        assert not self._unsettled
        return self.residual, {"dtype": self.dtype, "buckets": [list(b) for b in self.buckets],
                               "scale": list(self.scale)}

    def takes(self, saved):
        """Whether a state() description fits this allreduce (the same dtype and buckets): each rank can
        then take its own residual back."""
        return saved.get("dtype") == self.dtype and saved.get("buckets") == [list(b) for b in self.buckets]

    def load_state(self, residual, scales):
        """Go on from a checkpoint's state() (this rank's residual; `scales` None: unknown, the next step
        sends float32)."""
        self.residual[:] = residual
        self.scale = list(scales) if scales is not None else [None] * len(self.buckets)

    def _send(self, i):
        lo, hi = self.buckets[i]
        g, scale = self.buf[lo:hi], self.scale[i]
        self._sent_scale[i] = scale
        if scale is None:                                       # no agreed scale yet: this time in float32
            g += self.residual[lo:hi]
            self.residual[lo:hi] = 0.0
            ops = self._plain[i]
        else:
            encode(g, self.residual[lo:hi], scale, self.dtype, out=self.half[lo:hi])
            ops = self._halves[i]
        self.local_bound[i] = np.abs(g).max()                  # of what was sent, residual included
        return ops

    def _before_tail(self):
        self.buf[self.bound_slots] = self.local_bound

    def _front_summed(self, i):
        self._summed(i)
        self.scale = [agreed_scale(float(b), self.dtype) for b in self.buf[self.bound_slots]]

    def _summed(self, i):
        """Bucket i's half sum back into buf as float32 (nothing to do if it travelled in float32)."""
        lo, hi = self.buckets[i]
        scale = self._sent_scale[i]
        if scale is None:
            return                                              # buf holds the float32 sum already
        if all_finite(self.half[lo:hi], self.dtype):
            decode(self.half[lo:hi], scale, self.dtype, out=self.buf[lo:hi])
        else:                           # a sum overflowed, on every rank alike: again, in float32
            self.residual[lo:hi] = 0.0                          # buf[lo:hi] still holds what was rounded
            self._lanes[i].comm.allreduce_(self.buf[lo:hi])
            self.overflows += 1


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
        parts = recv.view(np.float16).astype(np.float32) if dtype == "float16" else from_bfloat16(recv)
        total = parts.sum(axis=0, dtype=np.float32)
        return to_float16(total).view(U16) if dtype == "float16" else to_bfloat16(total)

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
