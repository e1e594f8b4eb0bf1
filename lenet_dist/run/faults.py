"""--fault: failures rehearsed on purpose (tests, drills), parsed from RANK:STEP:KIND specs."""
from __future__ import annotations

import logging
import os
import signal
import sys
import time

import numpy as np


class FaultInjector:
    """Rehearse failures: RANK:STEP:KIND makes rank RANK, just before step STEP, do one of
    raise (an exception), exit (die at once, exit code 17), perturb (nudge one parameter: replicas drift),
    nan (poison its parameters: the loss becomes NaN), slow (from then on compute 3x slower: a straggler),
    hang (stop for good, alive but stuck, as a deadlocked rank would), term (send itself SIGTERM: a stop
    request that reaches one rank only).
    Several specs may be joined with commas."""

    KINDS = ("raise", "exit", "perturb", "nan", "slow", "hang", "term")
    SLOWDOWN = 3.0

    def __init__(self, specs):
        self.specs = specs

    @classmethod
    def parse(cls, text):
        specs = []
        for part in filter(None, (p.strip() for p in (text or "").split(","))):
            try:
                rank, step, kind = part.split(":")
                rank, step = int(rank), int(step)
            except ValueError:
                raise ValueError(f"--fault {part!r}: expected RANK:STEP:KIND, e.g. 1:30:raise") from None
            if kind not in cls.KINDS or rank < 0 or step < 0:
                raise ValueError(f"--fault {part!r}: KIND must be one of {', '.join(cls.KINDS)}, "
                                 f"RANK and STEP >= 0")
            specs.append((rank, step, kind))
        return cls(specs)

    def maybe_fire(self, trainer, rank):
        for r, step, kind in self.specs:
            if r != rank or step != trainer.step:
                continue
            logging.getLogger("lenet.fault").warning("injecting fault '%s' at step %d", kind, step)
            if kind == "raise":
                raise RuntimeError(f"injected fault at step {step}")
            if kind == "exit":
                sys.stderr.flush()
                os._exit(17)
            if kind == "perturb":
                trainer.model.params[0] += np.float32(1e-3)
            if kind == "nan":
                trainer.model.params[:] = np.nan
            if kind == "slow":
                from lenet_dist.parallel.reducers import Straggler
                trainer.reducer = Straggler(trainer.reducer, self.SLOWDOWN)
            if kind == "term":
                os.kill(os.getpid(), signal.SIGTERM)
            if kind == "hang":
                while True:
                    time.sleep(3600)
