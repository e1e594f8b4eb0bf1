"""The step's statistics, by name, and where they ride in the gradient buffer.

One allreduce carries the gradients and the step's figures together, so the figures sit in the buffer's
tail, after the NUM_PARAMS gradients; this module alone knows where:

    [ gradients | loss sum | correct | stop votes | seconds of rank 0 .. size-1 | the reducer's own slots ]

Every rank writes its own loss sum, count and vote, its seconds in its own slot and zero in the others', so
the sum holds the global batch's figures and every rank's compute time.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from lenet_dist.nn.model import NUM_PARAMS


class StepStats(NamedTuple):
    """One step's figures over all ranks."""
    loss_sum: float             # sum of the per-example losses over the global batch
    correct: int                # examples of the global batch classified right
    stop: bool                  # some rank asked to stop: every rank stops after this step
    seconds: np.ndarray         # (size,) seconds each rank spent computing its shard


class Tail:
    """The tail's slots for `size` ranks and `extra` slots of the reducer's (after the step's)."""

    def __init__(self, size, extra=0):
        self.size = size
        self.loss, self.correct, self.stop = NUM_PARAMS, NUM_PARAMS + 1, NUM_PARAMS + 2
        self.seconds = slice(NUM_PARAMS + 3, NUM_PARAMS + 3 + size)
        self.extra = slice(self.seconds.stop, self.seconds.stop + extra)
        self.length = self.extra.stop - NUM_PARAMS              # slots after the gradients

    def write(self, buf, rank, loss, correct, stop, seconds):
        """This rank's figures into `buf`'s tail (the reducer's slots zeroed)."""
        buf[NUM_PARAMS:] = 0
        buf[self.loss], buf[self.correct], buf[self.stop] = loss, correct, stop
        buf[self.seconds.start + rank] = seconds

    def read(self, buf):
        """StepStats from a summed float buffer."""
        return StepStats(float(buf[self.loss]), int(round(float(buf[self.correct]))), bool(buf[self.stop] > 0),
                         buf[self.seconds].copy())
