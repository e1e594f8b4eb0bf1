"""Live control on every rank (lenet-train --allow-control): rank 0's queued actions agreed after a step,
the pause, and the row that records each action.

Rank 0's link admits signed actions into a queue (transport/control.py). Before each step rank 0 asks
`wanted()`; if an action waits it casts the stop vote that already travels in the step's allreduce (no new
slot in the reducers), so every rank learns with that step's gradients that there is something to agree
on. After the step every rank calls `agree()`: one bcast_json from rank 0 carries the actions (and rank
0's early-stop line, if that was its vote), and every rank applies them in order after the same step. A
step without a vote costs nothing more. A paused run waits in `pause()`: rank 0 polls its queue for
continue or stop, and every rank for a signal of its own, in a small allreduce every NAP_S tested between
naps: the ranks sleep, the stall guard fed.
"""
from __future__ import annotations

import time

import numpy as np

from lenet_dist.comm import bcast_json

NAP_S = 0.1                 # a paused rank's sleep between looks


def row(step, action):
    """The --metrics row of an applied action."""
    return {"event": "control", "step": int(step), "action": action["action"], "value": action.get("value"),
            "source": action.get("source")}


def record(step, action):
    """Its entry in the checkpoint's record of configuration changes (meta config_changes)."""
    return {"step": int(step), "time": round(time.time(), 3),
            "control": {k: action.get(k) for k in ("action", "value", "source")}}


class LiveControl:
    """One rank's side of live control. `gate`: rank 0's ControlGate (None elsewhere, or without --publish)."""

    def __init__(self, comm, gate=None, nap=NAP_S):
        self.comm, self.gate, self.nap = comm, gate, nap

    def wanted(self):
        """Rank 0: an action waits, to be agreed after the next step."""
        return self.gate is not None and self.gate.pending()

    def agree(self, early=None):
        """Every rank, after a step some rank voted on: (rank 0's actions, oldest first; its early-stop line
        or None). `early`: rank 0's early-stop line, if it has one."""
        mine = None
        if self.comm.rank == 0:
            mine = {"actions": self.gate.take() if self.gate else [], "early": early}
        got = bcast_json(self.comm, mine)                                         # [dist]
        return got["actions"], got["early"]

    def pause(self, stopping, tick):
        """Every rank, paused after the same step: wait until rank 0 takes a resume or a stop action, or
        `stopping()` is true on any rank (a signal came to it); sleeping, calling `tick()` meanwhile. -> the
        action that ended the pause, alike on every rank ({"action": "signal"} for a signal).

        Every `nap` the ranks sum [rank 0 has an action, ranks with a signal] in one non-blocking allreduce,
        tested between naps (no rank spins), so a signal that reached one rank alone ends the pause too."""
        end = None
        while True:
            if self.comm.rank == 0 and end is None:
                got = self.gate.take(only=("resume", "stop")) if self.gate else []
                end = got[0] if got else None
            votes = np.array([int(end is not None), int(bool(stopping()))], np.int64)
            request = self.comm.iallreduce_(votes)                                # [dist]
            while not self.comm.test_all([request]):
                time.sleep(self.nap)
                tick()
            if votes.any():
                break
            time.sleep(self.nap)
            tick()
        return bcast_json(self.comm, end or {"action": "signal"})                 # [dist]
