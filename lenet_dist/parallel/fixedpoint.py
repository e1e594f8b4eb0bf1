"""--deterministic: the gradient summed exactly, so that it is bit-identical whatever the rank count.

The global batch is cut into fixed-size micro-batches; each micro-batch's gradient (and loss and count) is
rounded to a multiple of 2**-FIXED_POINT_BITS in int64 and summed as integers, over the micro-batches and
then over the ranks by the inner reducer (fused or bucketed, on the int64 buffer). Integer addition is
associative, so the sum, and the parameters, do not depend on how the micro-batches fall on the ranks.
"""
from __future__ import annotations

import numpy as np

from lenet_dist.nn.model import NUM_PARAMS

FIXED_POINT_BITS = 32           # gradients rounded to multiples of 2**-32
SCALE = float(2 ** FIXED_POINT_BITS)


class FixedPointReducer:
    """Wraps a reducer (unpipelined) that sums the int64 fixed-point buffer instead of the float one."""

    before = None
    waited = 0.0

    def __init__(self, inner, micro_batch):
        assert not inner.pipelined, "the fixed-point sum is read whole after the step"
        self.inner, self.micro_batch = inner, micro_batch
        self.tail_slots = inner.tail_slots

    def __getattr__(self, name):                # path, name, chooser, description: the inner reducer's
        return getattr(self.inner, name)

    def bind(self, buf, tail):
        self.buf, self.tail = buf, tail
        self.acc = np.zeros(len(buf), np.int64)
        self.inner.bind(self.acc, tail)

    def begin(self):
        self.inner.begin()
        self.acc[:] = 0
        self.buf[NUM_PARAMS:] = 0.0
        self._last, self._in_acc = None, NUM_PARAMS

    def pieces(self, lo, hi):
        """The shard's micro-batches. Backward's ready() calls count in the last one only: its finished
        layers join the sum and their buckets may leave."""
        starts = range(lo, hi, self.micro_batch)
        for start in starts:
            self._last = start == starts[-1]
            yield start, min(start + self.micro_batch, hi)

    def ready(self, offset):
        if self._last:
            self._fold(offset, self._in_acc)
            self._in_acc = offset
            self.inner.ready(offset)

    def add(self, loss, correct):
        buf = self.buf
        buf[self.tail.loss], buf[self.tail.correct] = loss, correct
        self._fold(NUM_PARAMS if self._last else 0, self.tail.stop)

    def _fold(self, lo, hi):
        self.acc[lo:hi] += np.rint(self.buf[lo:hi].astype(np.float64) * SCALE).astype(np.int64)

    def sum(self, stop, seconds):
        self.acc[self.tail.stop] = int(stop) << FIXED_POINT_BITS
        self.acc[self.tail.seconds.start + self.inner.comm.rank] = int(round(seconds * SCALE))
        self.inner.reduce()                                         # [dist] exact integer sum
        self.buf[:] = self.acc / SCALE
        return self.tail.read(self.buf)

    def update(self, apply):
        self.inner.update(apply)

    def settle(self):
        self.inner.settle()

    def state(self):
        return None

    def takes(self, saved):
        return False
