"""Ranks that share a core take turns: on a node with more ranks than cores, the node's ranks are split into
turns of at most `cores` ranks; each step, turn 0 computes its shards while the others sleep, then turn 1,
and so on; then the one sum over all ranks, as without turns.

    local ranks 0 1 | 2 3      (4 ranks, 2 cores: 2 turns of 2)
    step:  turn 0 computes, turns 1.. sleep  -> barrier 0 -> turn 1 computes -> ... -> barrier T-1
           -> the reducer's sum, every rank of the node there

Four ranks competing for two cores deliver less than two ranks alone (context switches, caches, a peer that
waits while the one it waits for is descheduled); two at a time, one pair after the other, deliver about
what two ranks do. The barriers are the node's (comm.turn_barrier: an Ibarrier tested between naps), so a
rank whose turn it is not sleeps instead of spinning.

Exact: every rank computes the same shard from the same parameters with the same code, only at another
moment, and the sum over the ranks is the same call with the same operands in the same order; nothing here
touches a number. Which turn a rank takes is its node-local rank's: rank // ceil(ranks / turns).

LENET_TURNS: unset or "off": no turns (the default: on an otherwise quiet 2-core machine, 4 ranks in turns
delivered 0.59 of `-n 2` against 0.74 without, docs/scaling.md); "auto": turns when a node holds a multiple of
its cores (4 ranks on 2 cores: 2 turns; 3 on 2 would leave a core idle in the second turn, so they share the
cores as before); N: N turns whatever the cores (at most one per rank).
"""
from __future__ import annotations

from collections import deque

VAR = "LENET_TURNS"
SLEEP_SHARE = 0.75          # of a turn's expected length, slept before napping (a turn varies from step to step)
RECENT_STEPS = 8            # compute times kept for that expectation


def parse_setting(text):
    """LENET_TURNS's value -> None (auto) or the number of turns asked for (1: off, the default); ValueError
    naming it."""
    t = (text or "").strip().lower()
    if t == "auto":
        return None
    if t in ("", "off", "none"):
        return 1
    if t.isdigit() and int(t) >= 1:
        return int(t)
    raise ValueError(f"{VAR} must be a number of turns (1 or more), 'auto' or 'off', got {text!r}")


def plan(local_rank, local_size, cores, setting=None):
    """(turns on this node, this rank's turn, ranks per turn) for `local_size` ranks on `cores` cores;
    `setting`: parse_setting's answer."""
    if setting is None:
        turns = local_size // cores if local_size > cores and local_size % cores == 0 else 1
    else:
        turns = min(setting, local_size)
    per = -(-local_size // max(turns, 1))
    return -(-local_size // per), local_rank // per, per


class TakingTurns:
    """Wraps the run's reducer: begin() sleeps through the turns before this rank's, sum() through its own
    and the ones after it (so the sum starts with every rank of the node there), then hands over to the
    reducer's own sum. Everything else is the reducer's.

    A turn lasts about as long as this rank's own compute (the same shard size, the same code), so a wait
    for another turn first sleeps SLEEP_SHARE of the shortest of its recent computes in one piece, then
    naps: testing the barrier between naps for a whole turn would cost CPU the computing turn could use."""

    def __init__(self, reducer, comm):
        self.reducer, self.comm = reducer, comm
        self.recent = deque(maxlen=RECENT_STEPS)        # this rank's compute seconds, last steps

    def __getattr__(self, name):
        return getattr(self.reducer, name)

    @property
    def description(self):
        c = self.comm
        return f"{self.reducer.description}; {c.turns} turns of {c.turn_size} rank(s) per node"

    def _turn_seconds(self):
        return SLEEP_SHARE * min(self.recent) if self.recent else 0.0

    def begin(self):
        for _ in range(self.comm.turn):
            self.comm.turn_barrier(self._turn_seconds())    # the turns before this rank's compute
        self.reducer.begin()

    def sum(self, stop, seconds):
        self.recent.append(seconds)
        self.comm.turn_barrier()                            # this turn's peers finish about now
        for _ in range(self.comm.turns - 1 - self.comm.turn):
            self.comm.turn_barrier(self._turn_seconds())    # the turns after it
        return self.reducer.sum(stop, seconds)


def taking_turns(reducer, comm):
    """`reducer` wrapped in turns when this rank's node takes them, else `reducer` itself."""
    return TakingTurns(reducer, comm) if getattr(comm, "turns", 1) > 1 else reducer
